"""Which domain each training sequence comes from: a fixed schedule of phases, or weights set online.

A mixture answers one question for the loader: for global sequence ``g`` of a run, its domain ``d`` and
``k``, how many sequences of ``d`` came before it (the loader then reads ``d``'s k-th window). Both kinds
realise their weights *exactly* up to rounding, in every prefix of the run, not only in expectation:

- ``ScheduledMixture``: phases over the run, each with fixed weights (natural proportions for the first
  80%, then upsample a domain for the last 20%, say). A phase is cut into blocks of ``MIX_BLOCK``
  sequences; each block holds every domain's quota (weight × block, rounded by largest remainder) and
  spreads each domain's sequences evenly over the block from a seeded offset (``interleave``), so every
  prefix of a block is within two sequences per domain of its share. ``draw(g)`` is a pure function of
  ``g``: a run resumes at any step, on any world size, with no replay.
- ``OnlineMixture``: weights that change every optimizer step (DoReMi). Each step's sequences are
  apportioned so the realised counts track the cumulative target ``Σ_t w_t · G`` to within one sequence;
  the counts so far are its state, saved with the checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np

from tokenmill import TokenmillError

MIX_BLOCK = 1 << 16  # fixed weights are realised exactly over each block, to 1/65536


class Mixture(Protocol):
    domains: list[str]

    def draw(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domain index of each global sequence index ``g``, and how many sequences of that domain came
        before it in the run."""


def normalise(weights: dict[str, float], domains: list[str], *, what: str = "domain_weights") -> np.ndarray:
    """Weights in ``domains`` order (absent = 0), summing to 1; unknown names or invalid values refused."""
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise TokenmillError(f"{what} names unknown domain(s) {unknown}; the tokens have {domains}")
    w = np.array([float(weights.get(d, 0.0)) for d in domains])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise TokenmillError(f"{what} must be finite, >= 0 and not all 0; got {weights}")
    return w / w.sum()


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(counts - exact, kind="stable")
    counts[by_remainder[: total - counts.sum()]] += 1
    return counts


def interleave(quota: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Slots for ``quota[d]`` sequences of each domain d, each domain's spread evenly from a random
    offset: per slot, its domain and that domain's count before it. The i-th sequence of d sits at
    key ``(i + u_d) / quota[d]``; slots follow the keys, so any prefix of n slots holds
    ``n · quota[d] / Σ quota`` of d, ± 2."""
    domain = np.repeat(np.arange(len(quota)), quota)
    earlier = np.arange(len(domain)) - np.repeat(np.cumsum(quota) - quota, quota)
    offset = rng.random(len(quota))
    key = (earlier + offset[domain]) / np.maximum(quota, 1)[domain]
    order = np.lexsort((rng.random(len(domain)), key))  # ties broken at random, not by domain index
    return domain[order], earlier[order]


class ScheduledMixture:
    """Fixed weights per phase. ``phases``: (end, weights) with ``end`` the global sequence index where the
    phase stops (the last phase never stops) and ``weights`` summing to 1 in ``domains`` order."""

    def __init__(self, domains: list[str], phases: list[tuple[int, np.ndarray]], seed: int):
        ends = [end for end, _ in phases[:-1]]
        if not phases or any(b <= a for a, b in zip([0] + ends, ends)):
            raise TokenmillError(f"mixture: phases must end at increasing sequence indices, got {ends}")
        self.domains, self.seed = domains, seed
        self.starts = np.array([0] + ends, np.int64)
        self.quotas = [apportion(w, MIX_BLOCK) for _, w in phases]
        self._block = lru_cache(maxsize=8)(self._block_uncached)
        # How many sequences of each domain every phase leaves behind, for the counts of the next one.
        self.before = np.zeros((len(phases), len(domains)), np.int64)
        for p in range(1, len(phases)):
            length = int(self.starts[p] - self.starts[p - 1])
            full, part = divmod(length, MIX_BLOCK)
            done = full * self.quotas[p - 1]
            if part:
                done = done + np.bincount(self._block(p - 1, full)[0][:part], minlength=len(domains))
            self.before[p] = self.before[p - 1] + done

    def draw(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phase = np.searchsorted(self.starts, g, side="right") - 1
        block, slot = np.divmod(g - self.starts[phase], MIX_BLOCK)
        domain, k = np.empty_like(g), np.empty_like(g)
        for p, b in {(int(p), int(b)) for p, b in zip(phase, block)}:
            rows = (phase == p) & (block == b)
            block_domain, block_earlier = self._block(p, b)
            domain[rows] = block_domain[slot[rows]]
            k[rows] = self.before[p, domain[rows]] + b * self.quotas[p][domain[rows]] + block_earlier[slot[rows]]
        return domain, k

    def _block_uncached(self, phase: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        return interleave(self.quotas[phase], np.random.default_rng([self.seed, 0, phase, block]))


class OnlineMixture:
    """Weights set before each optimizer step of ``per_step`` global sequences (``set_weights``); the
    step's sequences are then drawn by ``draw``. Its counts are state: ``state_dict`` after a step,
    ``load_state_dict`` to resume."""

    def __init__(self, domains: list[str], per_step: int, seed: int):
        self.domains, self.per_step, self.seed = domains, per_step, seed
        self.step = 0  # optimizer steps whose sequences have been apportioned
        self.counts = np.zeros(len(domains), np.int64)  # sequences of each domain before this step
        self.target = np.zeros(len(domains))  # Σ over steps so far of weights × per_step
        self._slots: tuple[np.ndarray, np.ndarray] | None = None

    def set_weights(self, weights: np.ndarray) -> None:
        """Apportion the next step's sequences so the realised counts keep up with the target."""
        if self._slots is not None:
            self.counts += np.bincount(self._slots[0], minlength=len(self.domains))
            self.step += 1
        self.target += weights * self.per_step
        want = np.maximum(self.target - self.counts, 0)
        quota = apportion(want if want.sum() > 0 else weights, self.per_step)
        rng = np.random.default_rng([self.seed, 2, self.step])
        self._slots = interleave(quota, rng)

    def draw(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._slots is None:
            raise TokenmillError("mixture: set_weights must run before the first step's sequences are drawn")
        slot = g - self.step * self.per_step
        if (slot < 0).any() or (slot >= self.per_step).any():
            raise TokenmillError(f"mixture: sequences {g.min()}..{g.max()} are not in step {self.step}'s "
                                 f"[{self.step * self.per_step}, {(self.step + 1) * self.per_step})")
        domain, earlier = self._slots[0][slot], self._slots[1][slot]
        return domain, self.counts[domain] + earlier

    def state_dict(self) -> dict:
        """The state after the current step: the step to apportion next and the counts before it."""
        done = self.counts + (np.bincount(self._slots[0], minlength=len(self.domains)) if self._slots else 0)
        return {"step": self.step + (self._slots is not None), "counts": done.tolist(),
                "target": self.target.tolist(), "domains": self.domains}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains:
            raise TokenmillError(f"mixture: cannot resume, the checkpoint mixed {state['domains']}, "
                                 f"these tokens have {self.domains}")
        self.step, self._slots = state["step"], None
        self.counts = np.array(state["counts"], np.int64)
        self.target = np.array(state["target"])

