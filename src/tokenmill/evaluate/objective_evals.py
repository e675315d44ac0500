"""Evaluation that suits each non-causal objective: what ``eval_bpb`` is to the decoder, for a masked LM,
ELECTRA and a span-corruption encoder-decoder.

On fixed held-out windows of the objective's own length (cut as the trainer cuts its validation windows,
and masked or corrupted the same way: seeded by the run's seed and each window's index above
``EVAL_G_OFFSET``, so every evaluation of a run sees the same inputs), per domain and pooled:

- **mlm**: masked-token accuracy, the MLM loss (nats per masked token) and the pseudo-log-likelihood in
  bits per byte (Salazar et al. 2020): each token of a window masked in turn, ``PLL = Σ log p(token |
  the rest)``, ``pll_bpb = -PLL / ln 2 / UTF-8 bytes of the window's text``. PLL costs one forward pass
  per token, so only the first ``pll_windows_per_domain`` windows of each domain are scored; tokens
  that carry no text (EOS and the other special tokens, which masking never chooses, so the model never
  learnt to predict them) are neither scored nor counted in the bytes;
- **electra**: the generator's masked-token accuracy and loss, and the discriminator's replaced-token
  detection accuracy over every position, beside the share of positions replaced (1 − that share is
  what always answering "original" scores) and the share of replaced ones it flags; the generator's
  samples are seeded per window;
- **span_corruption**: the teacher-forced loss per target token and the target-token accuracy, over
  every target (sentinels and EOS included, as the trainer's loss counts them);
- **every one**: a linear probe of the encoder (the MLM's encoder, ELECTRA's discriminator, the
  encoder-decoder's encoder): each window's mean-pooled final hidden states, standardised, a logistic
  regression cross-validated over stratified folds to tell the domains apart, beside the majority
  share it must beat.

Probabilities are over the tokenizer's vocabulary (the embedding's padding rows left out), in fp32, as
the decoder's bits per byte are computed from its export. Figures are pooled (sums over the windows,
then divided), so a domain's longer or denser windows weigh by their counts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.console import text_table
from tokenmill.evaluate.model_evals import load_run_recipe
from tokenmill.model.encoder import Electra, MaskedLM
from tokenmill.model.encoder_decoder import EncoderDecoder, shift_right
from tokenmill.model.llama import ModelConfig
from tokenmill.runfolder import ObjectiveFigures, ObjectiveProbe, ObjectiveResult, ObjectiveSettings, RunFolder
from tokenmill.tokens.corruption import mask_tokens, span_corrupt
from tokenmill.tokens.loader import TokenDataset, eval_windows
from tokenmill.tokens.tokenizer import load_tokenizer
from tokenmill.train.checkpoint import checkpoints, load_trained_model
from tokenmill.train.config import TrainConfig
from tokenmill.train.device import resolve_device
from tokenmill.train.objectives import EVAL_G_OFFSET, Masked, SpanCorruption, build_objective

DEFAULT_WINDOWS_PER_DOMAIN = 32
PLL_WINDOWS_PER_DOMAIN = 4
PROBE_FOLDS = 5


def eval_objective(run: Path, progress: bool | None = None, *,
                   pll_windows_per_domain: int = PLL_WINDOWS_PER_DOMAIN) -> ObjectiveResult:
    """Compute ``RUN/eval/objective.json`` from the newest checkpoint of a run trained with a non-causal
    objective (mlm, electra, span_corruption), with the recipe's eval settings: up to
    ``eval.max_docs_per_domain`` (else 32) windows per held-out domain, ``eval.batch_size`` per forward
    pass. Returns the result. ``progress`` as for ``eval_bpb``: True draws a bar, False prints a start and
    a finish line, None says nothing."""
    folder = RunFolder(run).require()
    recipe = load_run_recipe(run)
    if recipe.model.objective == "clm":
        raise TokenmillError(f"{run}: a causal decoder (model.objective clm) is evaluated by its bits per byte: "
                             f"use eval_bpb (`tokenmill eval --bpb`); eval_objective is for mlm, electra and "
                             f"span_corruption runs")
    if not (folder.heldout_tokens / "meta.json").is_file():
        raise TokenmillError(f"{run}: no held-out tokens ({folder.heldout_tokens}/meta.json is missing); run the "
                             f"pack stage with `tokenmill run` first")
    if not (folder.tokenizer / "tokenizer.json").is_file():
        raise TokenmillError(f"{run}: no tokenizer ({folder.tokenizer}/tokenizer.json is missing); run the "
                             f"tokenizer stage with `tokenmill run` first")
    found = checkpoints(folder.checkpoints)
    if not found:
        raise TokenmillError(f"{run}: no checkpoint in {folder.checkpoints}; train the model first")
    step = found[-1][0]
    model, cfg = load_trained_model(folder.checkpoints, step)
    if cfg.objective == "clm":
        raise TokenmillError(f"{folder.checkpoints}: the checkpoint is a causal decoder although the recipe says "
                             f"model.objective {recipe.model.objective}; retrain, or evaluate it with eval_bpb")
    max_windows = recipe.eval.max_docs_per_domain or DEFAULT_WINDOWS_PER_DOMAIN
    device = resolve_device("auto")
    if progress is False:
        print(f"eval: {cfg.objective} figures of step {step} on up to {max_windows} held-out windows per domain",
              flush=True)
    t0 = time.perf_counter()
    result = objective_figures(model.to(device), cfg, recipe.train, load_tokenizer(folder.tokenizer),
                               TokenDataset(folder.heldout_tokens), max_windows_per_domain=max_windows,
                               batch_size=recipe.eval.batch_size, device=device,
                               pll_windows_per_domain=pll_windows_per_domain, step=step, progress=progress is True)
    result.write(folder.objective_eval)
    if progress is False:
        print(f"eval: done in {time.perf_counter() - t0:.1f}s\n{objective_table(result)}", flush=True)
    return result


@torch.inference_mode()
def objective_figures(
    model: torch.nn.Module, cfg: ModelConfig, train_cfg: TrainConfig, tokenizer, dataset: TokenDataset, *,
    max_windows_per_domain: int = DEFAULT_WINDOWS_PER_DOMAIN, batch_size: int = 8,
    device: torch.device = torch.device("cpu"), pll_windows_per_domain: int = PLL_WINDOWS_PER_DOMAIN,
    step: int = 0, progress: bool = False,
) -> ObjectiveResult:
    """The figures of ``model`` (a ``MaskedLM``, ``Electra`` or ``EncoderDecoder`` on ``device``, trained with
    ``cfg`` and ``train_cfg``) on ``dataset``'s held-out windows; ``eval_objective`` without the run folder.
    The model is put in eval mode and left there."""
    if max_windows_per_domain < 1 or batch_size < 1 or pll_windows_per_domain < 0:
        raise TokenmillError(f"objective eval: need max_windows_per_domain >= 1, batch_size >= 1 and "
                             f"pll_windows_per_domain >= 0; got {max_windows_per_domain}, {batch_size}, "
                             f"{pll_windows_per_domain}")
    objective = build_objective(cfg, train_cfg, tokenizer)
    scorer = {"mlm": _MaskedLMScorer, "electra": _ElectraScorer, "span_corruption": _SpanScorer}[cfg.objective](
        model.eval(), cfg, objective, tokenizer, device, pll_windows_per_domain, batch_size)
    windows = eval_windows(dataset, objective.window_len - 1, max_windows_per_domain)
    if not windows:
        raise TokenmillError(f"objective eval: no held-out domain in {dataset.path} has {objective.window_len} "
                             f"tokens, one window; hold out more documents or train with a shorter train.seq_len")
    if len(windows) > 1:  # the probe's folds need two windows of every domain: say so before any work
        _check_probe_classes({d: len(x) for d, (x, _) in windows.items()})
    sums: dict[str, dict[str, float]] = {}
    features, labels = [], []
    n_batches = sum(math.ceil(len(x) / batch_size) for x, _ in windows.values())
    with tqdm(total=n_batches, desc="eval", unit="batch", leave=False, disable=not progress) as bar:
        for d, (domain, (x, y)) in enumerate(windows.items()):
            tokens = torch.cat([x, y[:, -1:]], dim=1)
            g = EVAL_G_OFFSET + (d << 24) + np.arange(len(tokens))  # as the trainer's validation windows
            total: dict[str, float] = {"windows": len(tokens), "tokens": tokens.numel()}
            for start in range(0, len(tokens), batch_size):
                batch, gb = tokens[start:start + batch_size], g[start:start + batch_size]
                _add(total, scorer.score(batch, gb))
                _add(total, scorer.pll(batch, first=start))
                features.append(scorer.features(batch))
                labels += [d] * len(batch)
                bar.update()
            sums[domain] = total
    overall: dict[str, float] = {}
    for total in sums.values():
        _add(overall, total)
    settings = ObjectiveSettings(
        step=step, window_len=objective.window_len, max_windows_per_domain=max_windows_per_domain,
        pll_windows_per_domain=pll_windows_per_domain if cfg.objective == "mlm" else None, batch_size=batch_size,
        seed=train_cfg.seed, device=str(device),
        domains_without_a_window=[d for d in dataset.domains if d not in windows] or None)
    return ObjectiveResult(objective=cfg.objective, domains={d: _figures(s) for d, s in sums.items()},
                           overall=_figures(overall), probe=linear_probe(np.concatenate(features), np.array(labels),
                                                                         list(windows)),
                           settings=settings)


def linear_probe(features: np.ndarray, labels: np.ndarray, names: list[str] | None = None,
                 folds: int = PROBE_FOLDS) -> ObjectiveProbe | None:
    """Stratified ``k``-fold cross-validated accuracy (k = min(folds, the smallest class)) of a standardised
    logistic regression predicting ``labels`` [N] (class indices) from ``features`` [N, D], pooled over
    the held-out folds, and the majority share beside it. None with fewer than two classes; an error when
    a class has a single example (no fold split can test it). Deterministic (fixed fold shuffle)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return None
    _check_probe_classes({names[c] if names else str(c): int(n) for c, n in zip(classes, counts)})
    k = int(min(folds, counts.min()))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = cross_val_predict(classifier, features, labels, cv=StratifiedKFold(k, shuffle=True, random_state=0))
    return ObjectiveProbe(accuracy=float(np.mean(predicted == labels)), baseline=float(counts.max() / counts.sum()),
                          folds=k, windows=len(labels), domains=len(classes))


def _check_probe_classes(counts: dict[str, int]) -> None:
    small = [d for d, n in counts.items() if n < 2]
    if small:
        raise TokenmillError(f"domain probe: domain(s) {', '.join(small)} have a single held-out window, too few to "
                             f"cross-validate; hold out more of their documents (heldout.max_docs_per_domain, "
                             f"heldout.min_docs_per_domain) or train with a shorter train.seq_len")


def objective_table(result: ObjectiveResult) -> str:
    """The result as a terminal table, domains by figure, and the probe line."""
    keys = [k for k in ObjectiveFigures.model_fields if k not in ("windows", "tokens") and
            getattr(result.overall, k) is not None and not k.endswith(("_tokens", "_bytes", "_windows", "_nats"))]
    rows = [(d, s.windows, *(getattr(s, k) for k in keys)) for d, s in sorted(result.domains.items())]
    rows.append(("overall (pooled)", result.overall.windows, *(getattr(result.overall, k) for k in keys)))
    text = text_table(["domain", "windows", *keys], rows)
    if result.probe is not None:
        p = result.probe
        text += (f"\ndomain probe: accuracy {p.accuracy:.4f} against the majority share {p.baseline:.4f} "
                 f"({p.windows} windows, {p.domains} domains, {p.folds}-fold)")
    return text


# ---- per objective -------------------------------------------------------------------------------


class _Scorer:
    """Sums of one objective's figures over a batch of windows [B, window_len] (on the CPU)."""

    def __init__(self, model, cfg: ModelConfig, objective, tokenizer, device: torch.device, pll_windows: int,
                 batch_size: int):
        self.model, self.cfg, self.objective, self.tokenizer = model, cfg, objective, tokenizer
        self.device, self.pll_windows, self.batch_size = device, pll_windows, batch_size
        self.vocab = cfg.vocab_size  # logits beyond it are the embedding's padding rows

    def score(self, windows: torch.Tensor, g: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def pll(self, windows: torch.Tensor, first: int) -> dict[str, float]:
        return {}

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, T, dim] the probe pools."""
        raise NotImplementedError

    def features(self, windows: torch.Tensor) -> np.ndarray:
        return self.encode(windows.to(self.device)).float().mean(dim=1).cpu().numpy().astype(np.float64)

    def _predicted(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
        """Summed loss and hits of ``logits`` [M, padded vocab] for ``labels`` [M], over the vocabulary."""
        logits = logits[:, : self.vocab].float()
        return {f"{prefix}_nats": F.cross_entropy(logits, labels, reduction="sum").item(),
                f"{prefix}_hits": (logits.argmax(-1) == labels).sum().item(), f"{prefix}_count": len(labels)}


class _Masking(_Scorer):
    objective: Masked

    def mask(self, windows: torch.Tensor, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.objective
        inputs, labels = mask_tokens(windows.numpy(), g, o.masking, seed=o.seed, mask_id=o.mask_id,
                                     vocab_size=o.vocab_size, special_ids=o.special_ids)
        return torch.from_numpy(inputs).to(self.device), torch.from_numpy(labels).to(self.device)

    def scorable(self, window: np.ndarray) -> np.ndarray:
        """Positions whose token masking may choose: text tokens, never EOS or the other special tokens."""
        o = self.objective
        special = np.union1d(o.special_ids, [o.mask_id])
        return np.flatnonzero(~np.isin(window, special) & (window >= 0) & (window < o.vocab_size))


class _MaskedLMScorer(_Masking):
    model: MaskedLM

    def score(self, windows, g):
        inputs, labels = self.mask(windows, g)
        masked = labels >= 0
        return self._predicted(self.model.predict(self.model.encoder(inputs)[masked]), labels[masked], "mlm")

    def pll(self, windows, first):
        """Pseudo-log-likelihood of the windows among the domain's first ``pll_windows``: every scorable
        token masked in its own copy of the window, the copies batched ``batch_size`` at a time."""
        total = {"pll_windows": 0, "pll_tokens": 0, "pll_bytes": 0, "pll_nats": 0.0}
        for row in range(max(0, min(len(windows), self.pll_windows - first))):
            window = windows[row].numpy()
            positions = self.scorable(window)
            nats = 0.0
            for start in range(0, len(positions), self.batch_size):
                pos = torch.from_numpy(positions[start:start + self.batch_size]).to(self.device)
                copies = windows[row].to(self.device).repeat(len(pos), 1)
                rows = torch.arange(len(pos), device=self.device)
                truth = copies[rows, pos].clone()
                copies[rows, pos] = self.objective.mask_id
                logits = self.model.predict(self.model.encoder(copies)[rows, pos])[:, : self.vocab].float()
                nats -= logits.log_softmax(-1)[rows, truth].double().sum().item()
            text = self.tokenizer.decode(window.tolist(), skip_special_tokens=True)
            _add(total, {"pll_windows": 1, "pll_tokens": len(positions), "pll_bytes": len(text.encode("utf-8")),
                         "pll_nats": nats})
        return total

    def encode(self, windows):
        return self.model.encoder(windows)


def sampling_seed(seed: int, g: int) -> int:
    """The seed of the ELECTRA generator's samples for the window of global index ``g``."""
    return int(seed * 1_000_003 + int(g))


class _ElectraScorer(_Masking):
    model: Electra

    def score(self, windows, g):
        """The generator's masked-token figures, then its samples (one generator per window, seeded by the
        window's index: the same draws whatever the batch) and the discriminator's verdict on them."""
        inputs, labels = self.mask(windows, g)
        masked = labels >= 0
        gen_logits = self.model.generator.predict(self.model.generator.encoder(inputs)[masked])
        figures = self._predicted(gen_logits, labels[masked], "mlm")
        probs = gen_logits[:, : self.vocab].float().softmax(-1)
        owner = masked.nonzero()[:, 0]  # the row of each masked position, in row-major order
        samples = torch.empty(len(owner), dtype=torch.long, device=self.device)
        for i, gi in enumerate(g.tolist()):
            mine = owner == i
            if mine.any():
                draw = torch.Generator(device=self.device).manual_seed(sampling_seed(self.objective.seed, gi))
                samples[mine] = torch.multinomial(probs[mine], 1, generator=draw).squeeze(-1)
        replaced_input = inputs.clone()
        replaced_input[masked] = samples
        original = torch.where(masked, labels, inputs)
        replaced = replaced_input != original
        real = original != self.model.pad_id if self.model.pad_id is not None else torch.ones_like(masked)
        flagged = self.model.rtd_logits(replaced_input) > 0
        figures.update(rtd_hits=((flagged == replaced) & real).sum().item(), rtd_count=real.sum().item(),
                       replaced=(replaced & real).sum().item(), detected=(flagged & replaced & real).sum().item())
        return figures

    def encode(self, windows):
        return self.model.discriminator(windows)


class _SpanScorer(_Scorer):
    model: EncoderDecoder
    objective: SpanCorruption

    def score(self, windows, g):
        o = self.objective
        enc, targets = span_corrupt(windows.numpy(), g, o.cfg, seed=o.seed, sentinel_ids=o.sentinel_ids,
                                    mode_ids=o.mode_ids, pad_id=o.pad_id, eos_id=o.eos_id,
                                    input_len=o.shapes.input_len, target_len=o.shapes.target_len)
        enc, targets = (torch.from_numpy(a).to(self.device) for a in (enc, targets))
        hidden, pad_bias = self.model.encode(enc)
        logits = self.model.decode(shift_right(targets, self.model.pad_id), hidden, pad_bias)
        scored = targets >= 0
        return self._predicted(logits[scored], targets[scored], "span")

    def encode(self, windows):
        """The encoder's states over the window's first ``input_len`` tokens, uncorrupted."""
        return self.model.encode(windows[:, : self.objective.shapes.input_len])[0]


# ---- pooling -------------------------------------------------------------------------------------


def _add(into: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        into[key] = into.get(key, 0) + value


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _figures(s: dict[str, float]) -> ObjectiveFigures:
    """Pooled figures from the sums of ``_Scorer`` (keys absent for other objectives stay None)."""
    pll = s.get("pll_windows")
    return ObjectiveFigures(
        windows=int(s["windows"]), tokens=int(s["tokens"]),
        masked_tokens=int(s["mlm_count"]) if "mlm_count" in s else None,
        masked_accuracy=_ratio(s.get("mlm_hits"), s.get("mlm_count")),
        mlm_loss=_ratio(s.get("mlm_nats"), s.get("mlm_count")),
        pll_bpb=_ratio(s["pll_nats"] / math.log(2), s["pll_bytes"]) if pll else None,
        pll_windows=int(pll) if pll is not None else None,
        pll_tokens=int(s["pll_tokens"]) if pll else None, pll_bytes=int(s["pll_bytes"]) if pll else None,
        pll_nats=float(s["pll_nats"]) if pll else None,
        rtd_accuracy=_ratio(s.get("rtd_hits"), s.get("rtd_count")),
        replaced_share=_ratio(s.get("replaced"), s.get("rtd_count")),
        rtd_recall=_ratio(s.get("detected"), s.get("replaced")),
        target_tokens=int(s["span_count"]) if "span_count" in s else None,
        span_loss=_ratio(s.get("span_nats"), s.get("span_count")),
        span_accuracy=_ratio(s.get("span_hits"), s.get("span_count")),
    )

