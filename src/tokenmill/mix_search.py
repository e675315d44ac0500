"""``tokenmill mix search``: find the domain weights to train a recipe with, by training small proxies.

RegMix (Liu et al. 2024) with CLIMB's rounds (Diao et al. 2025): proxies of the recipe's model, shrunk
by ``mix_search.proxy_model``, train on many mixtures at one token budget; a regressor learns their
held-out bits per byte from the weights and predicts the best mixture (``tokenmill.select.mixture_search``
holds that algorithm; this module trains the proxies and keeps the books). The search folder::

    OUT/
      data/               a run folder of the recipe up to its pack stage, shared by every proxy:
                          curated documents, tokenizer, token shards, held-out documents
      plan.json           the mixtures chosen so far, round by round, and the settings that chose them
      proxies/pNNN/       proxy.json (its mixture and inputs), train/ (metrics.jsonl; checkpoints until
                          it finishes), result.json (held-out bits per byte per domain, FLOPs, seconds)
      search.json         settings, every proxy, the held-out Spearman rho, total cost, the best mixture
      proxies.csv         the proxies as a table
      best_mixture.yaml   the recipe fragment to train with, and the equivalent --set

Every proxy starts from the same initial weights and sees its batches in the same seeded order, so
mixtures differ only in their data. Everything is written atomically and a proxy is done once its
result.json exists, so rerunning the command after a crash, or with more rounds, trains only what is
missing; a proxy whose inputs changed (model, training settings, data) is trained again, and says why.
Its cost (``search.json``'s ``cost``: every proxy's training and scoring FLOPs and seconds) is what
``tokenmill compare`` charges to a run that names the search folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.console import text_table
from tokenmill.files import read_json, write_json_atomic
from tokenmill.model.bpb import bits_per_byte
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.recipe import Recipe
from tokenmill.run import Runner, make_executor
from tokenmill.runfolder import MIX_SEARCH, RunFolder
from tokenmill.select.mixture_search import (MixSearchConfig, Planned, best_mixture, choose_next_round,
                                             first_round, fit_regressor, floor_weights, predict, resolve_regressor,
                                             spearman_rho)
from tokenmill.tokens.loader import TokenDataset
from tokenmill.tokens.tokenizer import load_tokenizer
from tokenmill.train.checkpoint import load_trained_model
from tokenmill.train.config import TrainConfig
from tokenmill.train.device import resolve_device
from tokenmill.train.loop import train


@dataclass(frozen=True)
class ProxyJob:
    """Everything one proxy needs, picklable, so it runs in this process or as a Ray task alike."""

    name: str
    round: int
    kind: str
    predicted: float | None
    weights: dict[str, float]
    fingerprint: str  # of the model, the training settings (mixture included), the data and the scoring
    model: ModelConfig
    train: TrainConfig
    data: Path  # the search's data run folder
    eval_batch_size: int
    eval_max_docs: int | None
    folder: Path
    progress: bool


def train_proxy(job: ProxyJob) -> dict[str, Any]:
    """Train one proxy (resuming its checkpoints), score its held-out bits per byte per domain, write
    ``result.json`` and return it. Checkpoints are deleted once the result is written: a search keeps
    tens of proxies, and the result is all it reads."""
    folder, data = job.folder, RunFolder(job.data)
    planned = read_json(folder / "proxy.json")
    if planned is not None and planned.get("fingerprint") != job.fingerprint:
        shutil.rmtree(folder)  # begun for another mixture or other settings
    write_json_atomic({"fingerprint": job.fingerprint, "round": job.round, "kind": job.kind,
                       "predicted": job.predicted, "weights": job.weights}, folder / "proxy.json")
    summary = train(job.model, job.train, data.train_tokens, folder / "train", progress=job.progress)
    t0 = time.perf_counter()
    model, _ = load_trained_model(folder / "train" / "checkpoints")
    device = resolve_device(job.train.device)
    scored = bits_per_byte(model.to(device), load_tokenizer(data.tokenizer),
                           pq.read_table(data.heldout, columns=["text", "domain"]), seq_len=job.train.seq_len,
                           batch_size=job.eval_batch_size, device=device, max_docs_per_domain=job.eval_max_docs)
    with torch.device("meta"):
        flops_per_token = Llama(job.model).flops_per_token(job.train.seq_len)
    result = {
        "fingerprint": job.fingerprint, "round": job.round, "kind": job.kind, "predicted": job.predicted,
        "weights": job.weights, "bpb": {d: s["bpb"] for d, s in scored["domains"].items()},
        "macro_bpb": scored["macro_bpb"], "tokens": summary["tokens"],
        # training is 6·N per token plus attention; scoring a forward pass, a third of that, over windows that
        # overlap by half, so a long document's tokens pass through twice (counted so for all: an upper bound)
        "train_flops": flops_per_token * summary["tokens"],
        "eval_flops": flops_per_token / 3 * 2 * scored["overall"]["tokens"],
        "seconds": summary["seconds"] + time.perf_counter() - t0,
    }
    write_json_atomic(result, folder / "result.json")
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)
    return result


def search_mixture(recipe: Recipe, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the mixture search of ``recipe`` into ``out``; return what ``search.json`` holds."""
    out = Path(out)
    folder = RunFolder(out)
    folder.create()
    with folder.lock():
        data = Runner(recipe, out / "data", progress=progress).run(until="pack")
        return _Search(recipe, out, RunFolder(data), progress).run()


class _Search:
    def __init__(self, recipe: Recipe, out: Path, data: RunFolder, progress: bool):
        self.recipe, self.out, self.data, self.progress = recipe, out, data, progress
        self.cfg = cfg = recipe.mix_search or MixSearchConfig()
        dataset = TokenDataset(data.train_tokens)
        self.domains = dataset.domains
        if len(self.domains) < 2:
            raise TokenmillError(f"mix search needs 2 or more domains to mix; {data.train_tokens} holds "
                                 f"{self.domains}: give each source its own domain")
        tokens = np.array([dataset.n_tokens(d) for d in self.domains], np.float64)
        self.natural = tokens / tokens.sum()
        floor_weights(self.natural, cfg.min_weight)  # says so now if the floors cannot fit
        # The target is measured on the held-out documents' own domains, which are not the training ones
        # when the loader mixes clusters (pack.domain_field: cluster, as CLIMB does).
        heldout = sorted(set(pq.read_table(data.heldout, columns=["domain"]).column("domain").to_pylist()))
        self.heldout_domains = heldout
        self.target = heldout if cfg.target.domains == "macro" else cfg.target.domains
        unknown = [d for d in self.target if d not in heldout]
        if unknown:
            raise TokenmillError(f"mix_search.target.domains: {unknown} not in the corpus's held-out documents "
                                 f"({data.heldout}), whose domains are {heldout}; a domain too small to hold out "
                                 f"documents needs a higher heldout.min_docs_per_domain or heldout.fraction")
        self.regressor = resolve_regressor(cfg.regressor)
        self.model = _proxy_model(recipe, load_tokenizer(data.tokenizer), cfg)
        self.train_cfg = _proxy_train(recipe.train, cfg.proxy_steps)
        self.base = _fingerprint({
            "model": self.model.model_dump(mode="json"), "train": self.train_cfg.model_dump(mode="json"),
            "data": data.read_stage_records()["pack"].fingerprint, "eval.max_docs_per_domain":
                recipe.eval.max_docs_per_domain})

    # ---- the rounds ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        plan = self._read_plan()
        rows: list[dict[str, Any]] = []
        rho = None
        for r in range(cfg.rounds):
            if r == len(plan):
                plan.append(first_round(self.natural, cfg) if r == 0 else
                            choose_next_round(self._fit(rows), self.natural, self._matrix(rows), cfg, r))
                self._write_plan(plan)
            rows += self._train_round(r + 1, plan[r], len(rows))
            if r == 0:
                rho = self._heldout_rho(rows)
        self._remove_stale(len(rows))
        model = self._fit(rows)
        best, predicted = best_mixture(model, self.natural, cfg)
        return self._write(rows, rho, best, predicted)

    def _fit(self, rows: list[dict[str, Any]]):
        return fit_regressor(self._matrix(rows), [r["target"] for r in rows], self.regressor, self.cfg.seed)

    def _matrix(self, rows: list[dict[str, Any]]) -> np.ndarray:
        return np.array([[r["weights"][d] for d in self.domains] for r in rows])

    def _heldout_rho(self, rows: list[dict[str, Any]]) -> float | None:
        """Fit on the first round without its held-out proxies, predict those, and rank-correlate the
        predictions with what they measured; each held-out row keeps its prediction."""
        held = [r for r in rows if r["kind"] == "heldout"]
        if not held:
            return None
        model = self._fit([r for r in rows if r["kind"] != "heldout"])
        for row, value in zip(held, predict(model, self._matrix(held))):
            row["predicted"] = float(value)
        return spearman_rho([r["predicted"] for r in held], [r["target"] for r in held])

    def _plan_fingerprint(self) -> str:
        """What the choice of mixtures depends on: every setting but the number of rounds (more rounds
        extend a plan), the proxies' inputs (their results steer later rounds) and the corpus."""
        settings = self.cfg.model_dump(mode="json")
        settings.pop("rounds")
        return _fingerprint({"settings": settings, "proxies": self.base, "natural": self.natural.tolist(),
                             "domains": self.domains, "regressor": self.regressor})

    def _read_plan(self) -> list[list[Planned]]:
        """The rounds already chosen with these settings (a fit is not bit-reproducible across library
        versions, so a rerun follows the recorded plan rather than choosing again); none otherwise."""
        saved = read_json(self.out / "plan.json")
        if saved is None or saved.get("fingerprint") != self._plan_fingerprint():
            if saved is not None:
                print("[tokenmill] mix search: settings changed; choosing the mixtures again")
            return []
        return [[Planned(np.array([p["weights"][d] for d in self.domains]), p["kind"], p["predicted"])
                 for p in chosen] for chosen in saved["rounds"][:self.cfg.rounds]]

    def _write_plan(self, plan: list[list[Planned]]) -> None:
        write_json_atomic({"fingerprint": self._plan_fingerprint(), "rounds": [
            [{"weights": self._named(p.weights), "kind": p.kind, "predicted": p.predicted} for p in chosen]
            for chosen in plan]}, self.out / "plan.json")

    def _named(self, weights: np.ndarray) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, weights)}

    # ---- the proxies ---------------------------------------------------------------------------------
    def _train_round(self, round_no: int, chosen: list[Planned], first: int) -> list[dict[str, Any]]:
        """Train the round's proxies that have no result of their current inputs; return every proxy's
        row, in order."""
        jobs = [self._job(first + i, round_no, p) for i, p in enumerate(chosen)]
        results, pending = {}, []
        for job in jobs:
            result = read_json(job.folder / "result.json")
            if result is not None and result.get("fingerprint") == job.fingerprint:
                results[job.name] = {**result, "reused": True}
                shutil.rmtree(job.folder / "train" / "checkpoints", ignore_errors=True)  # killed before removing
            else:
                if result is not None:
                    print(f"[tokenmill] mix search: {job.name} trains again (its mixture or settings changed)")
                pending.append(job)
        print(f"[tokenmill] mix search round {round_no}/{self.cfg.rounds}: {len(pending)} proxies to train, "
              f"{len(jobs) - len(pending)} reused")
        for name, result in self._run_jobs(pending):
            results[name] = {**result, "reused": False}
        return [self._row(job, results[job.name]) for job in jobs]

    def _job(self, index: int, round_no: int, planned: Planned) -> ProxyJob:
        weights = self._named(planned.weights)
        train_cfg = self.train_cfg.model_copy(update={"domain_weights": weights})
        return ProxyJob(name=f"p{index:03d}", round=round_no, kind=planned.kind, predicted=planned.predicted,
                        weights=weights, fingerprint=_fingerprint([self.base, weights]), model=self.model,
                        train=train_cfg, data=self.data.root.resolve(), eval_batch_size=self.recipe.eval.batch_size,
                        eval_max_docs=self.recipe.eval.max_docs_per_domain,
                        folder=(self.out / "proxies" / f"p{index:03d}").resolve(), progress=self.progress)

    def _run_jobs(self, jobs: list[ProxyJob]):
        """Yield ``(name, result)`` as proxies finish: one after another here (torch already uses every
        core), or one Ray task each with ``curate.executor: ray``, a GPU apiece where the cluster has them."""
        if not jobs:
            return
        if self.recipe.curate.executor != "ray":
            for job in jobs:
                print(f"[tokenmill] mix search: {job.name} ({job.kind}) {_short(job.weights)}")
                yield job.name, train_proxy(job)
            return
        with make_executor(self.recipe.curate, self.progress):  # starts or attaches to the cluster
            import ray

            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            task = ray.remote(num_gpus=gpus)(train_proxy)
            running = {task.remote(replace(job, progress=False)): job for job in jobs}
            print(f"[tokenmill] mix search: {len(jobs)} proxies submitted to Ray" + (", a GPU each" if gpus else ""))
            try:
                while running:
                    (done,), _ = ray.wait(list(running), num_returns=1)
                    job = running.pop(done)
                    yield job.name, ray.get(done)
                    print(f"[tokenmill] mix search: {job.name} done")
            except ray.exceptions.RayTaskError as err:
                raise err.cause from err  # the proxy's own exception, as when it runs here

    def _row(self, job: ProxyJob, result: dict[str, Any]) -> dict[str, Any]:
        return {"proxy": job.name, "round": job.round, "kind": job.kind,
                "predicted": job.predicted, "weights": job.weights,
                "target": float(np.mean([result["bpb"][d] for d in self.target])), "bpb": result["bpb"],
                "tokens": result["tokens"], "flops": result["train_flops"] + result["eval_flops"],
                "seconds": result["seconds"], "reused": result["reused"]}

    def _remove_stale(self, n: int) -> None:
        """Proxy folders past the plan (a search with fewer rounds or proxies than before) no longer count."""
        for path in sorted((self.out / "proxies").glob("p[0-9][0-9][0-9]")):
            if int(path.name[1:]) >= n:
                print(f"[tokenmill] mix search: removing {path.name}, no longer part of the search")
                shutil.rmtree(path)

    # ---- the answer ------------------------------------------------------------------------------------
    def _write(self, rows: list[dict[str, Any]], rho: float | None, best: np.ndarray,
               predicted: float) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        weights = {d: round(float(w), 4) for d, w in zip(self.domains, best)}
        mixture = {"phases": [{"until": 1.0, "weights": weights}], "searched": str(out.resolve())}
        flow = yaml.safe_dump(mixture, default_flow_style=True, width=float("inf")).strip()
        set_arg = f"--set {shlex.quote(f'train.mixture={flow}')}"
        natural = next(r for r in rows if r["kind"] == "natural")
        best_proxy = min(rows, key=lambda r: r["target"])
        held = [r["proxy"] for r in rows if r["kind"] == "heldout"]
        result = {
            "recipe": self.recipe.name, "settings": cfg.model_dump(mode="json"), "regressor": self.regressor,
            "domains": self.domains, "natural": self._named(self.natural),
            "target": {"domains": self.target, "metric": "held-out bits per byte, mean over the domains"},
            "proxy": {"model": self.model.model_dump(mode="json"), "steps": cfg.proxy_steps,
                      "tokens": cfg.proxy_steps * self.train_cfg.global_batch_tokens},
            "proxies": rows,
            "heldout": {"proxies": held, "spearman_rho": rho},
            "cost": {"flops": sum(r["flops"] for r in rows), "seconds": sum(r["seconds"] for r in rows)},
            "best": {"weights": weights, "predicted_target": predicted, "set": set_arg},
            "natural_target": natural["target"],
            "best_proxy": {"proxy": best_proxy["proxy"], "target": best_proxy["target"]},
        }
        write_json_atomic(result, out / MIX_SEARCH)
        _write_text_atomic(out / "proxies.csv", self._csv(rows))
        _write_text_atomic(out / "best_mixture.yaml", (
            f"# Domain weights found by `tokenmill mix search` (search.json beside this file: every proxy,\n"
            f"# the regressor's held-out rho, the proxy compute, which `tokenmill compare` charges to the run).\n"
            f"# Train with them: tokenmill run RECIPE --out runs/NAME {set_arg}\n"
            + yaml.safe_dump({"train": {"mixture": mixture}}, sort_keys=False)))
        self._print(result, rows)
        return result

    def _csv(self, rows: list[dict[str, Any]]) -> str:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["proxy", "round", "kind", *(f"weight/{d}" for d in self.domains), "predicted", "target",
                         *(f"bpb/{d}" for d in self.heldout_domains), "tokens", "flops", "seconds"])
        for r in rows:
            writer.writerow([r["proxy"], r["round"], r["kind"], *(r["weights"][d] for d in self.domains),
                             r["predicted"], r["target"], *(r["bpb"].get(d) for d in self.heldout_domains),
                             r["tokens"], r["flops"], r["seconds"]])
        return text.getvalue()

    def _print(self, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        print(text_table(["proxy", "round", "kind", *self.domains, "predicted", "target"],
                         [(r["proxy"], r["round"], r["kind"], *(r["weights"][d] for d in self.domains),
                           r["predicted"], r["target"]) for r in rows]))
        rho, held = result["heldout"]["spearman_rho"], result["heldout"]["proxies"]
        print(f"target: held-out bits per byte, mean over {', '.join(self.target)}")
        print(f"held-out Spearman rho: {rho:.3f} over {len(held)} proxies" if rho is not None else
              f"held-out Spearman rho: not measured (held-out proxies: {len(held)}; it needs 3 or more, with "
              f"differing targets)")
        print(f"proxy compute: {result['cost']['flops']:.3g} FLOPs, {result['cost']['seconds']:.1f} s "
              f"({len(rows)} proxies, {sum(r['reused'] for r in rows)} reused)")
        print(f"best mixture (mean of the top {self.cfg.top_k} of {self.cfg.candidates:,} predicted): "
              f"{_short(result['best']['weights'])}, predicted target {result['best']['predicted_target']:.4f} "
              f"(natural measured {result['natural_target']:.4f}, best proxy {result['best_proxy']['proxy']} "
              f"{result['best_proxy']['target']:.4f})")
        print(f"wrote {self.out / MIX_SEARCH}, {self.out / 'proxies.csv'}, {self.out / 'best_mixture.yaml'}")
        print(f"train with it: tokenmill run RECIPE --out runs/NAME {result['best']['set']}")


def _proxy_model(recipe: Recipe, tokenizer, cfg: MixSearchConfig) -> ModelConfig:
    """The recipe's model with the proxy's shape and the tokenizer's vocabulary and EOS, trained from
    scratch (a starting checkpoint belongs to the full-size model). A changed width or head count
    resets the feed-forward width and KV heads to their defaults for it."""
    shape = {k: v for k, v in cfg.proxy_model.model_dump().items() if v is not None}
    base = recipe.model.model_dump(exclude={"preset", "init_from", "grow_from", "grow"})
    if "dim" in shape:
        base.pop("ffn_hidden")
    if "n_heads" in shape:
        base.pop("n_kv_heads")
    try:
        return ModelConfig.model_validate({**base, **shape, "vocab_size": len(tokenizer),
                                           "eos_id": tokenizer.eos_token_id})
    except ValidationError as err:
        raise TokenmillError(f"mix_search.proxy_model {shape} with the recipe's model gives no valid proxy: "
                             + "; ".join(e["msg"] for e in err.errors())) from None


def _proxy_train(train_cfg: TrainConfig, steps: int) -> TrainConfig:
    """The recipe's training settings for ``steps`` steps: the warm-up scaled to the same share of them,
    a checkpoint at the end (and as often as the recipe's), no evaluation or logging service, and no
    mixture of the recipe's own (each proxy sets its domain weights)."""
    settings = train_cfg.model_dump()
    settings.update(max_steps=steps, warmup_steps=min(steps - 1, round(train_cfg.warmup_steps * steps /
                                                                       train_cfg.max_steps)),
                    ckpt_every=min(train_cfg.ckpt_every, steps), keep_last_k=1, bpb_every=None, tensorboard=False,
                    wandb=None, domain_weights=None, mixture=None)  # each proxy sets its own weights
    return TrainConfig.model_validate(settings)


def _fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _short(weights: dict[str, float]) -> str:
    return ", ".join(f"{d} {w:.3f}" for d, w in weights.items())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
