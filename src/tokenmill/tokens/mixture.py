"""Which domain each training sequence comes from: a schedule of phases with fixed weights.

A mixture answers one question for the loader: for global sequence ``g`` of a run, its domain ``d`` and
``k``, how many sequences of ``d`` came before it (the loader then reads ``d``'s k-th window). Phases
cover the run, each with fixed weights (natural proportions for the first 80%, then upsample a domain
for the last 20%, say), realised *exactly* up to rounding in every prefix of a phase, not only in
expectation: a phase is cut into blocks of ``MIX_BLOCK`` sequences; each block holds every domain's quota
(weight × block, rounded by largest remainder) and spreads each domain's sequences evenly over the
block from a seeded offset (``interleave``), so every prefix of a block is within two sequences per
domain of its share. ``draw(g)`` is a pure function of ``g``: a run resumes at any step, on any world
size, with no replay.
"""

from __future__ import annotations

from functools import lru_cache
import numpy as np

from tokenmill import TokenmillError

MIX_BLOCK = 1 << 16  # fixed weights are realised exactly over each block, to 1/65536


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
        """Domain index of each global sequence index ``g``, and how many sequences of that domain came
        before it in the run."""
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
