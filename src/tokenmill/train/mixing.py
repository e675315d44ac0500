"""The recipe's mixture made concrete for one run: the loader's domain schedule, DoReMi's domain loss
weights, loss-based sequence weights and the MeCo metadata view of the tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenmill import TokenmillError
from tokenmill.files import read_jsonl
from tokenmill.tokens.loader import TokenDataset, natural_weights
from tokenmill.tokens.mixture import ScheduledMixture, normalise
from tokenmill.train.config import DoReMiConfig, MixturePhase, TrainConfig


def sequences_per_step(cfg: TrainConfig) -> int:
    return cfg.global_batch_tokens // cfg.seq_len


def phase_weights(phase: MixturePhase, dataset: TokenDataset) -> np.ndarray:
    """A phase's weights in ``dataset.domains`` order, summing to 1."""
    if phase.weights is not None:
        return normalise(phase.weights, dataset.domains, what="train.mixture weights")
    natural = natural_weights(dataset)
    if phase.upsample is None:
        return natural
    unknown = sorted(set(phase.upsample) - set(dataset.domains))
    if unknown:
        raise TokenmillError(f"train.mixture upsample names unknown domain(s) {unknown}; the tokens have "
                             f"{dataset.domains}")
    weights = natural * np.array([phase.upsample.get(d, 1.0) for d in dataset.domains])
    if weights.sum() <= 0:
        raise TokenmillError(f"train.mixture upsample {phase.upsample} leaves no domain with weight")
    return weights / weights.sum()


def build_mixture(cfg: TrainConfig, dataset: TokenDataset) -> ScheduledMixture:
    """The loader's mixture: the phases on their optimizer-step boundaries."""
    mixture = cfg.mixture_phases()
    per_step = sequences_per_step(cfg)
    ends = [end * per_step for end in cfg.phase_end_steps()]
    phases = [(end, phase_weights(p, dataset)) for end, p in zip(ends, mixture.phases)]
    kept = [(end, w) for (end, w), start in zip(phases, [0] + ends) if end > start]  # a phase of 0 steps
    return ScheduledMixture(dataset.domains, kept, cfg.seed)


class DoReMi:
    """Group DRO over domains (Xie et al. 2023, Algorithm 1). The data keep their sampling proportions
    ``sampled``; the loss of a sequence of domain d is weighted by ``α_d / sampled_d``, so the step
    minimises ``Σ_d α_d · L_d`` as the paper's proxy does, and after every step
    ``α ← normalise(α · exp(η · max(L_d − L_ref,d, 0)))``, then ``α ← (1 − c) α + c/k``. Domains absent
    from a step's batch have excess 0. ``mean`` is the average of the weights over steps: the mixture
    DoReMi hands to the final run (``train.domain_weights``)."""

    def __init__(self, cfg: DoReMiConfig, start: np.ndarray, reference: np.ndarray):
        self.cfg = cfg
        self.sampled = start
        self.weights = start.copy()
        self.reference = reference
        self.total = np.zeros_like(start)
        self.steps = 0

    def update(self, loss_sum: np.ndarray, count: np.ndarray) -> None:
        """One step's per-domain sums of sequence losses and sequence counts."""
        seen = count > 0
        excess = np.where(seen, np.maximum(loss_sum / np.maximum(count, 1) - self.reference, 0), 0)
        log_w = np.log(self.weights) + self.cfg.step_size * excess
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        self.weights = (1 - self.cfg.smoothing) * w + self.cfg.smoothing / len(w)
        self.total += self.weights
        self.steps += 1

    def sequence_weights(self, domain: torch.Tensor) -> torch.Tensor:
        """Each sequence's loss weight, ``α_d / sampled_d`` of its domain d (mean 1 over the sampled data)."""
        ratio = np.divide(self.weights, self.sampled, out=np.zeros_like(self.weights), where=self.sampled > 0)
        ratio = torch.as_tensor(ratio, dtype=torch.float32, device=domain.device)
        return ratio[domain]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.steps, 1)

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "total": self.total.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.total = np.array(state["weights"]), np.array(state["total"])
        self.steps = state["steps"]


def build_doremi(cfg: TrainConfig, dataset: TokenDataset) -> DoReMi | None:
    mixture = cfg.mixture_phases()
    if mixture.online != "doremi":
        return None
    start = phase_weights(mixture.phases[0], dataset)
    return DoReMi(mixture.doremi, start, reference_losses(mixture.doremi.reference, dataset.domains))


def reference_losses(reference: str, domains: list[str]) -> np.ndarray:
    """The final per-domain validation loss of a finished run (its folder, or its train/ folder)."""
    root = Path(reference)
    path = next((p for p in (root / "train" / "metrics.jsonl", root / "metrics.jsonl") if p.is_file()), None)
    if path is None:
        raise TokenmillError(f"train.mixture.doremi.reference={reference}: no train/metrics.jsonl there; name a "
                             f"finished run folder trained on the same tokens")
    last = next((r for r in reversed(read_jsonl(path)) if "val_loss" in r), None)
    missing = [d for d in domains if last is None or f"val_loss/{d}" not in last]
    if missing:
        raise TokenmillError(f"train.mixture.doremi.reference={reference}: its validation records lack domain(s) "
                             f"{missing}; the reference must be evaluated on every domain of this run")
    return np.array([last[f"val_loss/{d}"] for d in domains])


def sequence_weights(seq_loss: torch.Tensor, temperature: float) -> torch.Tensor:
    """Loss-based sample reweighting: softmax of the detached losses over the batch, scaled to mean 1, so
    the weighted mean is the plain mean when every loss is equal."""
    return torch.softmax(seq_loss.detach().float() / temperature, dim=0) * seq_loss.numel()


def metadata_view(cfg: TrainConfig, dataset: TokenDataset, tokenizer_dir: Path | None) -> tuple[TokenDataset | None, int]:
    """MeCo's prefixed view of the tokens and the global sequence where the cool-down starts; (None, 0)
    without metadata conditioning."""
    if cfg.metadata is None:
        return None, 0
    if tokenizer_dir is None:
        raise TokenmillError("train.metadata needs the run's tokenizer to encode the metadata (tokenizer_dir)")
    from tokenmill.tokens.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    template = cfg.metadata.template
    view = dataset.prefixed(cfg.metadata.field,
                            lambda value: tokenizer.encode(template.format(value=value), add_special_tokens=False))
    until_step = round((1 - cfg.metadata.cooldown_fraction) * cfg.max_steps)
    return view, until_step * sequences_per_step(cfg)
