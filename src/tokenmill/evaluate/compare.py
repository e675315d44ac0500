"""Compare runs on every evaluation they share, at equal tokens and at equal training compute.

Each run folder becomes series of ``(tokens seen, value)`` per metric:

- ``val_loss``, ``val_loss/<domain>``: validation loss in nats per token, logged during training
  (``train/metrics.jsonl``);
- ``val_bpb``, ``val_bpb/<domain>``: the same curves in bits per byte, each domain's loss times the
  tokens per byte of its held-out documents (``tokens/heldout/meta.json``) over ln 2, and their mean
  over domains like ``val_loss``. An estimate (the validation windows stand for the whole held-out
  domain), but one every run has, so runs with different tokenizers compare at every evaluation step;
- ``bpb``, ``bpb/<domain>``: bits per byte of held-out documents measured during training
  (``train.bpb_every``), pooled over domains for ``bpb``;
- ``eval_bpb``, ``eval_bpb/<domain>``: the same after training (``eval/bpb.json``), one point at the
  run's final token count;
- ``<task>/<metric>``: lm-evaluation-harness results (``eval/harness.json``), one point likewise;
- for the non-causal objectives (``eval/objective.json``, ``tokenmill.runfolder.OBJECTIVE_FIGURES``), one
  point likewise: ``probe_accuracy`` (the linear domain probe of the encoder, every objective),
  ``pll_bpb`` and ``pll_bpb/<domain>`` (mlm's pseudo-log-likelihood bits per byte), ``masked_accuracy`` and
  ``mlm_loss`` (mlm; electra's generator), ``rtd_accuracy`` (electra), ``span_loss`` and ``span_accuracy``
  (span_corruption). Their ``val_loss`` is the objective's own loss, and they have no ``val_bpb`` (a
  masked or corrupted token's loss is no code length of the text).

Training compute at D tokens is ``select_flops + mix_search_flops + flops_per_token · D``: the model's own
count per token (6·N plus attention, ``Llama.flops_per_token``), the data-selection cost the run declares in
``select_cost.json`` (``tokenmill.runfolder.SelectCost``) and, for a run whose domain weights came from
``tokenmill mix search`` (``train.mixture.searched`` names the search folder), every proxy that search
trained and scored (its ``search.json``'s cost). The equal-tokens view reads each metric at the
largest token count all runs reached, the equal-compute view at the largest FLOP count all reached.
Between logged points a value is interpolated linearly in log tokens; a run whose series does not span
the point has no value there, so one-point metrics appear in a view only when the runs end on that point.

Loss per token depends on the tokenizer: when runs' tokenizers differ, the loss metrics are marked not
comparable, while bits per byte and harness metrics stay comparable. Losses of different objectives measure
different things: when runs train different objectives, ``val_loss`` is marked not comparable, and so is an
objective figure that runs of different objectives both have (an MLM's masked-token accuracy against an
ELECTRA generator's); the domain probe compares every objective.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill import TokenmillError
from tokenmill.console import text_table
from tokenmill.evaluate.model_evals import load_run_recipe
from tokenmill.evaluate.scaling import fit_chinchilla, fit_data_law, predict
from tokenmill.files import read_json
from tokenmill.model.hf import hf_model_config
from tokenmill.model.build import build_model
from tokenmill.model.llama import ModelConfig
from tokenmill.recipe import Recipe
from tokenmill.runfolder import (
    OBJECTIVE_FIGURES,
    ObjectiveResult,
    RunFolder,
    SelectCost,
    harness_rows,
    read_mix_search_cost,
)
from tokenmill.train.checkpoint import checkpoints

_GROUPS = ("val_loss", "val_bpb", "bpb", "eval_bpb")  # metric families in display order; harness metrics come after


@dataclass(frozen=True)
class RunCurves:
    """One run as the comparison sees it: its size, its cost per token and its evaluation series."""

    name: str
    path: Path
    params: int  # N in 6·N·D: the matmul weights, output head included
    flops_per_token: float
    select: SelectCost | None
    mix_search: SelectCost | None  # the proxy compute of the mixture search the run's weights came from
    tokenizer: str | None  # fingerprint of the tokenizer the run packed its tokens with
    tokens: float  # tokens seen by the end of training
    series: dict[str, list[tuple[float, float]]]
    higher_is_better: dict[str, bool]
    objective: str = "clm"  # model.objective: what val_loss measures

    @property
    def select_flops(self) -> float:
        return self.select.flops if self.select else 0.0

    @property
    def mix_search_flops(self) -> float:
        return self.mix_search.flops if self.mix_search else 0.0

    def flops(self, tokens: float) -> float:
        return self.select_flops + self.mix_search_flops + self.flops_per_token * tokens

    def tokens_at(self, flops: float) -> float:
        return (flops - self.select_flops - self.mix_search_flops) / self.flops_per_token


def load_run(path: Path, name: str | None = None) -> RunCurves:
    """Read a trained run folder (``recipe.yaml``, ``train/metrics.jsonl`` and whatever ``eval/`` holds)."""
    path = Path(path)
    recipe = load_run_recipe(path)
    folder = RunFolder(path)
    metrics = folder.read_metrics()
    if not metrics:
        raise TokenmillError(f"{path}: no train/metrics.jsonl, so nothing to compare yet; train the run first")
    train_meta = read_json(folder.train_tokens / "meta.json") or {}
    objective = recipe.model.objective
    with torch.device("meta"):  # shapes only: the model's own parameter and FLOP counts, no memory
        model = build_model(_model_config(path, recipe, train_meta))
    tokens = float(max(m["tokens"] for m in metrics if "tokens" in m))
    heldout = (read_json(folder.heldout_tokens / "meta.json") or {}).get("domains", {}) if objective == "clm" else {}
    series = _training_series(metrics, heldout)
    higher_is_better = {}
    bpb = folder.read_bpb()
    if bpb:
        series["eval_bpb"] = [(tokens, bpb.overall.bpb)]
        series.update({f"eval_bpb/{d}": [(tokens, s.bpb)] for d, s in bpb.domains.items()})
    harness = read_json(folder.harness)
    for task, metric, value, _, better in harness_rows(harness) if harness else []:
        series[f"{task}/{metric}"] = [(tokens, value)]
        higher_is_better[f"{task}/{metric}"] = bool(better)
    evaluated = folder.read_objective_eval()
    if evaluated:
        series.update(objective_series(evaluated, tokens))
    return RunCurves(name or path.name, path, model.num_params(exclude_embedding=True),
                     float(model.flops_per_token(recipe.train.seq_len)), folder.read_select_cost(),
                     _mix_search_cost(recipe), train_meta.get("tokenizer_fingerprint"), tokens, series,
                     higher_is_better, objective)


def objective_series(result: ObjectiveResult, tokens: float) -> dict[str, list[tuple[float, float]]]:
    """One point at ``tokens`` per figure of ``eval/objective.json`` that the run has (its pooled value;
    per domain too for ``pll_bpb``, as ``eval_bpb``)."""
    series = {}
    if result.probe is not None:
        series["probe_accuracy"] = [(tokens, result.probe.accuracy)]
    for key in OBJECTIVE_FIGURES:
        value = getattr(result.overall, key, None)
        if value is not None:
            series[key] = [(tokens, value)]
    series.update({f"pll_bpb/{d}": [(tokens, s.pll_bpb)] for d, s in result.domains.items() if s.pll_bpb is not None})
    return series


def _mix_search_cost(recipe: Recipe) -> SelectCost | None:
    """The proxy compute of the ``tokenmill mix search`` folder the run's mixture names, if it names one."""
    searched = recipe.train.mixture.searched if recipe.train.mixture else None
    if not searched:
        return None
    cost = read_mix_search_cost(Path(searched))
    if cost is None:
        raise TokenmillError(f"train.mixture.searched={searched}: no finished mixture search there (search.json "
                             f"is missing), so its proxy compute cannot be charged; point it at the search "
                             f"folder, or rerun `tokenmill mix search` into it")
    return cost


def _model_config(path: Path, recipe: Recipe, train_meta: dict) -> ModelConfig:
    """The shape the run trained: its export's, else its starting checkpoint's, else the recipe's model
    with the vocabulary it packed its tokens with. An encoder's or encoder-decoder's export is no Llama:
    their shape is their newest checkpoint's, else the recipe's."""
    if recipe.model.objective != "clm":
        found = checkpoints(RunFolder(path).checkpoints)
        if found:
            return ModelConfig.model_validate(json.loads((found[-1][1] / "state.json").read_text())["model_config"])
        pad = recipe.model.pad_id if recipe.model.pad_id is not None else 0  # any valid id: only shapes are read
        return recipe.model.model_copy(update={"vocab_size": train_meta.get("vocab_size", recipe.model.vocab_size),
                                               "pad_id": pad})
    for source in (path / "model", recipe.model.init_from):
        if source and (Path(source) / "config.json").is_file():
            return hf_model_config(Path(source))
    return recipe.model.model_copy(update={"vocab_size": train_meta.get("vocab_size", recipe.model.vocab_size)})


def compare_runs(paths: list[Path], *, fit: bool = False, n_bootstrap: int = 200) -> dict:
    """The comparison of ``paths`` as a JSON-ready dict (what ``compare.json`` holds).

    Keys: ``runs`` (size and cost of each), ``same_tokenizer``, ``warnings``, ``metrics`` (unit,
    direction, comparability), ``series`` ({run: {metric: [[tokens, value], ...]}}), ``final``,
    ``equal_tokens`` and ``equal_compute`` (each ``{"tokens"|"flops": x, "values": {metric: {run: v}}}``;
    ``final`` has only ``values``), and with ``fit`` the scaling-law fit (``fit_runs``).
    """
    if len(paths) < 2:
        raise TokenmillError(f"compare needs at least two run folders, got {len(paths)}")
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths))]
    fingerprints = {r.tokenizer for r in runs}
    same_tokenizer = len(fingerprints) == 1 and None not in fingerprints
    warnings = [] if same_tokenizer else [
        "The runs do not share one tokenizer ("
        + ", ".join(f"{r.name}: {r.tokenizer or 'unknown'}" for r in runs)
        + "), so their losses per token (val_loss rows) are not comparable and are struck through. "
          "Compare bits per byte (val_bpb, bpb, eval_bpb), which does not depend on the tokenizer."]
    if len({r.objective for r in runs}) > 1:
        warnings.append(
            "The runs train different objectives (" + ", ".join(f"{r.name}: {r.objective}" for r in runs)
            + "), so their validation losses measure different things and are struck through, as is any "
              "objective figure runs of different objectives share. Compare probe_accuracy, the linear domain "
              "probe every encoder is evaluated with (the decoders: bits per byte, harness tasks).")
    metrics = sorted(set().union(*(r.series for r in runs)), key=_metric_order)
    equal_tokens = min(r.tokens for r in runs)
    equal_flops = min(r.flops(r.tokens) for r in runs)
    result = {
        "runs": [{"name": r.name, "path": str(r.path), "params": r.params, "flops_per_token": r.flops_per_token,
                  "tokens": r.tokens, "train_flops": r.flops_per_token * r.tokens, "select_flops": r.select_flops,
                  "select_seconds": r.select.seconds if r.select else None, "mix_search_flops": r.mix_search_flops,
                  "mix_search_seconds": r.mix_search.seconds if r.mix_search else None, "flops": r.flops(r.tokens),
                  "tokenizer": r.tokenizer, "objective": r.objective} for r in runs],
        "same_tokenizer": same_tokenizer,
        "warnings": warnings,
        "metrics": {m: _describe(m, runs, same_tokenizer) for m in metrics},
        "series": {r.name: {m: [list(p) for p in r.series[m]] for m in metrics if m in r.series} for r in runs},
        "final": {"values": {m: {r.name: r.series[m][-1][1] if m in r.series else None for r in runs}
                             for m in metrics}},
        "equal_tokens": {"tokens": equal_tokens,
                         "values": {m: {r.name: _at(r.series.get(m), equal_tokens) for r in runs} for m in metrics}},
        "equal_compute": {"flops": equal_flops,
                          "values": {m: {r.name: _at(r.series.get(m), r.tokens_at(equal_flops)) for r in runs}
                                     for m in metrics}},
    }
    if fit:
        result["fit"] = fit_runs(runs, same_tokenizer, n_bootstrap=n_bootstrap)
    return result


def fit_runs(runs: list[RunCurves], same_tokenizer: bool, *, n_bootstrap: int = 200) -> dict:
    """Fit a scaling law to each run's ``(N, D, last validation value)``: ``L(D) = E + B/D^β`` when every
    run has the same N, Chinchilla's ``L(N, D)`` otherwise; on ``val_loss``, or on ``val_bpb`` when the
    tokenizers differ. Returns the constants, their bootstrap intervals, observed against predicted,
    and the fitted curve per N over the runs' range of D (for plotting)."""
    target = "val_loss" if same_tokenizer else "val_bpb"
    missing = [r.name for r in runs if not r.series.get(target)]
    if missing:
        raise TokenmillError(f"--fit: run(s) {', '.join(missing)} logged no {target} to fit; they need validation "
                             f"during training (train.eval_every) and held-out tokens")
    points = [(r.params, *max(r.series[target])) for r in runs]  # the last evaluation of each run
    sizes = sorted({n for n, _, _ in points})
    law = fit_data_law if len(sizes) == 1 else fit_chinchilla
    fitted = law(points, n_bootstrap=n_bootstrap)
    d_grid = np.geomspace(min(d for _, d, _ in points), max(d for _, d, _ in points), 50)
    return {
        "law": fitted.law,
        "formula": "L(D) = E + B / D^beta" if fitted.law == "data" else "L(N, D) = E + A / N^alpha + B / D^beta",
        "target": target,
        "params": fitted.params,
        "intervals": {k: list(v) for k, v in fitted.intervals.items()},
        "confidence": fitted.confidence,
        "n_bootstrap": n_bootstrap,
        "huber_loss": fitted.huber_loss,
        "points": [{"run": r.name, "N": n, "D": d, "observed": v, "predicted": predict(fitted, n, d)}
                   for r, (n, d, v) in zip(runs, points)],
        "curves": {str(n): [[float(d), float(v)] for d, v in zip(d_grid, predict(fitted, n, d_grid))] for n in sizes},
    }


def summary_table(result: dict, view: str) -> str:
    """``view`` (``final``, ``equal_tokens`` or ``equal_compute``) as a terminal table, metrics by run."""
    names = [r["name"] for r in result["runs"]]
    rows = [(metric + ("  (not comparable)" if not result["metrics"][metric]["comparable"] else ""),
             *(values[n] for n in names)) for metric, values in result[view]["values"].items()]
    return text_table(["metric", *names], rows)


def cost_table(result: dict) -> str:
    """Each run's compute as a terminal table: training, data selection, mixture search, their total."""
    return text_table(["run", "tokens", "training FLOPs", "selection FLOPs", "mixture-search FLOPs", "total FLOPs"],
                      [(r["name"], int(r["tokens"]), r["train_flops"], r["select_flops"] or None,
                        r["mix_search_flops"] or None, r["flops"]) for r in result["runs"]])


def _training_series(metrics: list[dict], heldout_domains: dict) -> dict[str, list[tuple[float, float]]]:
    """The curves logged during training (validation loss, bits per byte), and the validation loss in
    bits per byte through each held-out domain's tokens per byte."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in metrics:
        for key, value in record.items():
            if key.split("/")[0] in ("val_loss", "bpb"):
                series.setdefault(key, []).append((float(record["tokens"]), float(value)))
    for domain, stats in heldout_domains.items():
        if f"val_loss/{domain}" in series and stats.get("bytes"):
            per_byte = stats["tokens"] / stats["bytes"] / math.log(2)
            series[f"val_bpb/{domain}"] = [(t, v * per_byte) for t, v in series[f"val_loss/{domain}"]]
    domains = [points for key, points in series.items() if key.startswith("val_bpb/")]
    if domains:  # every domain is logged in the same records, so their points line up
        series["val_bpb"] = [(pts[0][0], float(np.mean([v for _, v in pts]))) for pts in zip(*domains)]
    return series


def _at(points: list[tuple[float, float]] | None, x: float) -> float | None:
    """The value at ``x`` tokens, linear in log tokens between logged points; None outside them."""
    if not points or x <= 0:
        return None
    xs, ys = np.log([p[0] for p in points]), np.array([p[1] for p in points])
    order = np.argsort(xs)
    xs, ys, lx = xs[order], ys[order], math.log(x)
    if lx < xs[0] - 1e-9 or lx > xs[-1] + 1e-9:  # tolerance: FLOPs → tokens round-trips in floating point
        return None
    return float(np.interp(lx, xs, ys))


def _describe(metric: str, runs: list[RunCurves], same_tokenizer: bool) -> dict:
    family = metric.split("/")[0]
    having = {r.objective for r in runs if metric in r.series}
    if family in _GROUPS:
        is_loss = family == "val_loss"
        return {"unit": "nats/token" if is_loss else "bits/byte", "higher_is_better": False,
                "comparable": (same_tokenizer and len(having) == 1) or not is_loss}
    if family in OBJECTIVE_FIGURES:
        info = OBJECTIVE_FIGURES[family]
        return {"unit": info.unit, "higher_is_better": info.higher_is_better,
                "comparable": (same_tokenizer or info.tokenizer_free)
                and (family == "probe_accuracy" or len(having) == 1)}
    better = next(r.higher_is_better[metric] for r in runs if metric in r.higher_is_better)
    return {"unit": "", "higher_is_better": better, "comparable": True}


def _metric_order(metric: str) -> tuple:
    """The families in order (the objective figures after the decoder's), each before its per-domain
    rows; harness metrics last, by name."""
    family, _, domain = metric.partition("/")
    families = [*_GROUPS, *OBJECTIVE_FIGURES]
    if family in families:
        return families.index(family), domain != "", metric
    return len(families), False, metric


def _names(paths: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]
