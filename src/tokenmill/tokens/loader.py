"""Deterministic, resumable, domain-mixed training batches cut from packed token shards.

Every batch is a pure function of (seed, step): global sequence ``g`` of a run is chosen by

1. its **domain**: sequences come in blocks of ``MIX_BLOCK``; each block holds every domain's quota
   (its weight times the block, rounded) in a seeded random order, so the mixture is exact per block
   and the domain of ``g`` — and how many sequences its domain had before it — is known without
   replaying earlier steps;
2. its **window**: a domain's documents, in index order, form one token stream cut into
   non-overlapping windows of ``seq_len + 1`` tokens; the domain's k-th sequence is window
   ``perm_e[k mod W]`` of epoch ``e = k div W``, a fresh seeded permutation each epoch.

Resuming at step k therefore needs only k, any world size with the same global batch reads the same
sequences, and a new mixture needs no re-tokenisation.
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tokenmill import TokenmillError

MIX_BLOCK = 1 << 16  # mixture weights are realised exactly over each block, to 1/65536


class TokenDataset:
    """A packed tokens directory (see ``pack``), memory-mapped, read as one token stream per domain."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise TokenmillError(f"tokens: {self.path} has no meta.json; pack documents into it first")
        self.meta = json.loads(meta_path.read_text())
        self.eos_id: int = self.meta["eos_id"]
        self.domains: list[str] = sorted(self.meta["domains"])
        dtype = np.dtype(self.meta["dtype"])
        self._shards = [_map(self.path / f"shard-{i:05d}.bin", dtype) for i in range(self.meta["n_shards"])]
        if sum(len(shard) for shard in self._shards) != self.meta["n_tokens"]:
            raise TokenmillError(f"tokens: shard sizes in {self.path} disagree with meta.json; repack it")
        index = pq.read_table(self.path / "index.parquet", columns=["domain", "shard", "offset", "length"])
        self._runs = {}
        for domain in self.domains:
            docs = index.filter(pc.equal(index.column("domain"), domain))
            self._runs[domain] = _runs(*(docs.column(c).to_numpy() for c in ("shard", "offset", "length")))

    def n_tokens(self, domain: str) -> int:
        """Tokens in ``domain``'s stream (documents plus their EOS separators)."""
        return int(self._runs[domain].end[-1])

    def read(self, domain: str, positions: np.ndarray) -> np.ndarray:
        """The tokens at ``positions`` (any shape) of ``domain``'s stream, as int64."""
        runs = self._runs[domain]
        run = np.searchsorted(runs.start, positions, side="right") - 1
        shard = runs.shard[run]
        where = runs.offset[run] + positions - runs.start[run]
        tokens = np.empty(positions.shape, np.int64)
        for s in np.unique(shard):
            in_shard = shard == s
            tokens[in_shard] = self._shards[s][where[in_shard]]
        return tokens


class TokenLoader:
    """Batches ``(x, y, domain_idx)`` by step; rank r of w gets rows [r*B, (r+1)*B) of each global batch."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int,
        domain_weights: dict[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1 or seed < 0 or not 0 <= rank < world_size:
            raise TokenmillError(
                "loader: need seq_len >= 1, batch_size >= 1, seed >= 0 and 0 <= rank < world_size; got "
                f"seq_len={seq_len}, batch_size={batch_size}, seed={seed}, rank={rank}, "
                f"world_size={world_size}"
            )
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.domains = dataset.domains
        self.step = 0
        weights = _weights(dataset, domain_weights)
        self._windows = np.array([dataset.n_tokens(d) // (seq_len + 1) for d in self.domains], np.int64)
        starved = [d for d, w, n in zip(self.domains, weights, self._windows) if w > 0 and n == 0]
        if starved:
            raise TokenmillError(
                f"loader: domain(s) {starved} have fewer tokens than one window of seq_len+1={seq_len + 1}; "
                "give them weight 0 in domain_weights or use a shorter seq_len"
            )
        self._quota = _apportion(weights, MIX_BLOCK)
        self._quota_start = np.cumsum(self._quota) - self._quota
        self._block = lru_cache(maxsize=4)(self._block_uncached)
        self._epoch_order = lru_cache(maxsize=4 * len(self.domains))(self._epoch_order_uncached)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``: x, y LongTensor [B, T] (y is x shifted by one)
        and domain_idx LongTensor [B] (an index into ``domains``)."""
        first = (step * self.world_size + self.rank) * self.batch_size
        domain, k = self._draw(first + np.arange(self.batch_size, dtype=np.int64))
        window = self._window(domain, k)
        tokens = np.empty((self.batch_size, self.seq_len + 1), np.int64)
        span = np.arange(self.seq_len + 1)
        for d in np.unique(domain):
            rows = domain == d
            tokens[rows] = self.dataset.read(self.domains[d], window[rows, None] * (self.seq_len + 1) + span)
        tokens = torch.from_numpy(tokens)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(domain)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            step, self.step = self.step, self.step + 1
            yield self.batch(step)

    def state_dict(self) -> dict:
        """The step to resume at, with the settings that must match for the resumed batches to match."""
        global_batch = self.batch_size * self.world_size
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "global_batch": global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['step']``; the seed, window and global batch must be those it was saved with."""
        mine = self.state_dict()
        changed = [key for key in ("seed", "seq_len", "global_batch") if state[key] != mine[key]]
        if changed:
            raise TokenmillError(
                f"loader: cannot resume, {', '.join(f'{k} was {state[k]} now {mine[k]}' for k in changed)}; "
                "resume with the settings the checkpoint was trained with"
            )
        self.step = state["step"]

    def _draw(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domain of each global sequence index, and how many sequences that domain had before it."""
        block, slot = np.divmod(g, MIX_BLOCK)
        domain, earlier = np.empty_like(g), np.empty_like(g)
        for b in np.unique(block):
            in_block = block == b
            block_domain, block_earlier = self._block(int(b))
            domain[in_block] = block_domain[slot[in_block]]
            earlier[in_block] = block_earlier[slot[in_block]]
        return domain, block * self._quota[domain] + earlier

    def _window(self, domain: np.ndarray, k: np.ndarray) -> np.ndarray:
        epoch, j = np.divmod(k, self._windows[domain])
        window = np.empty_like(k)
        for d, e in {(int(d), int(e)) for d, e in zip(domain, epoch)}:
            rows = (domain == d) & (epoch == e)
            window[rows] = self._epoch_order(d, e)[j[rows]]
        return window

    def _block_uncached(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Per slot of ``block``: its domain, and how many earlier slots of the block had that domain."""
        quota_domain = np.repeat(np.arange(len(self.domains)), self._quota)
        domain = np.random.default_rng([self.seed, 0, block]).permutation(quota_domain)
        earlier = np.empty(MIX_BLOCK, np.int64)
        by_domain = np.argsort(domain, kind="stable")
        earlier[by_domain] = np.arange(MIX_BLOCK) - np.repeat(self._quota_start, self._quota)
        return domain, earlier

    def _epoch_order_uncached(self, domain: int, epoch: int) -> np.ndarray:
        # Seeded by the domain's name, not its position, so its order survives adding other domains.
        name = zlib.crc32(self.domains[domain].encode())
        return np.random.default_rng([self.seed, 1, name, epoch]).permutation(self._windows[domain])


def eval_windows(
    dataset: TokenDataset, seq_len: int, max_windows_per_domain: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation windows per domain, spread evenly over its stream: ``{domain: (x, y)}``.

    A domain with fewer tokens than one window has no entry.
    """
    windows = {}
    span = np.arange(seq_len + 1)
    for domain in dataset.domains:
        available = dataset.n_tokens(domain) // (seq_len + 1)
        count = min(available, max_windows_per_domain)
        if count:
            chosen = np.arange(count) * available // count
            tokens = torch.from_numpy(dataset.read(domain, chosen[:, None] * (seq_len + 1) + span))
            windows[domain] = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return windows


def _weights(dataset: TokenDataset, domain_weights: dict[str, float] | None) -> np.ndarray:
    """Normalised weight per dataset domain: the given ones (absent = 0), else each domain's token share."""
    if domain_weights is None:
        weights = np.array([dataset.n_tokens(d) for d in dataset.domains], np.float64)
    else:
        unknown = sorted(set(domain_weights) - set(dataset.domains))
        if unknown:
            raise TokenmillError(
                f"loader: domain_weights names unknown domain(s) {unknown}; the tokens in "
                f"{dataset.path} have {dataset.domains}"
            )
        weights = np.array([float(domain_weights.get(d, 0.0)) for d in dataset.domains])
        if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise TokenmillError(
                f"loader: domain_weights must be finite, >= 0 and not all 0; got {domain_weights}"
            )
    return weights / weights.sum()


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(counts - exact, kind="stable")
    counts[by_remainder[: total - counts.sum()]] += 1
    return counts


class _Runs(NamedTuple):
    """A domain's stream as runs of back-to-back tokens: where each run lies in which shard, and
    where it starts and ends in the stream."""

    shard: np.ndarray
    offset: np.ndarray
    start: np.ndarray
    end: np.ndarray


def _runs(shard: np.ndarray, offset: np.ndarray, length: np.ndarray) -> _Runs:
    """Merge documents lying back to back in one shard, so a domain packed from one input shard is a
    single run and finding a window is one binary search over few runs, not over every document."""
    breaks = np.ones(len(shard), bool)
    breaks[1:] = (shard[1:] != shard[:-1]) | (offset[1:] != offset[:-1] + length[:-1])
    first = np.flatnonzero(breaks)
    run_length = np.add.reduceat(length, first)
    end = np.cumsum(run_length)
    return _Runs(shard[first], offset[first], end - run_length, end)


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise TokenmillError(f"tokens: missing shard {path}; the tokens directory is incomplete, repack it")
    # np.memmap cannot map an empty file; an input shard with no documents packs to one.
    return np.memmap(path, dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)
