"""Deterministic, resumable, domain-mixed training batches cut from packed token shards.

Every batch is a pure function of (seed, step): global sequence ``g`` of a run is chosen by

1. its **domain**, from the mixture (``tokens/mixture.py``): the domain of ``g`` and how many sequences
   of that domain came before it, exact per phase of a schedule and known without replaying earlier steps;
2. its **window**: a domain's documents, in index order, form one token stream cut into
   non-overlapping windows of ``seq_len + 1`` tokens; the domain's k-th sequence is window
   ``perm_e[k mod W]`` of epoch ``e = k div W``, a fresh seeded permutation each epoch.

With metadata conditioning (MeCo) the sequences before ``metadata_until`` are cut from a second stream
per domain in which every document is preceded by its metadata's tokens (tokenised once per distinct
value, never the corpus again); targets inside those prefixes are -1, so they carry no loss.

Resuming at step k therefore needs only k, any world size with the same global batch reads the same
sequences, and a new mixture needs no re-tokenisation.
"""

from __future__ import annotations

import copy
import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tokenmill import TokenmillError
from tokenmill.tokens.mixture import ScheduledMixture, normalise


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
        self.dtype = np.dtype(self.meta["dtype"])
        self._shards = [_map(self.path / f"shard-{i:05d}.bin", self.dtype) for i in range(self.meta["n_shards"])]
        if sum(len(shard) for shard in self._shards) != self.meta["n_tokens"]:
            raise TokenmillError(f"tokens: shard sizes in {self.path} disagree with meta.json; repack it")
        self.index = pq.read_table(self.path / "index.parquet")
        self._docs = {}
        for domain in self.domains:
            docs = self.index.filter(pc.equal(self.index.column("domain"), domain))
            self._docs[domain] = docs
        self._runs = {d: _runs(*_columns(docs, ("shard", "offset", "length"))) for d, docs in self._docs.items()}
        self._prefix_shard = -1  # the shard index of metadata prefixes, in a ``prefixed`` view

    def n_tokens(self, domain: str) -> int:
        """Tokens in ``domain``'s stream (documents plus their EOS separators)."""
        return int(self._runs[domain].end[-1])

    def read(self, domain: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens at ``positions`` (any shape) of ``domain``'s stream, as int64, and whether each is
        part of a metadata prefix (always False outside a ``prefixed`` view)."""
        runs = self._runs[domain]
        run = np.searchsorted(runs.start, positions, side="right") - 1
        shard = runs.shard[run]
        where = runs.offset[run] + positions - runs.start[run]
        tokens = np.empty(positions.shape, np.int64)
        for s in np.unique(shard):
            in_shard = shard == s
            tokens[in_shard] = self._shards[s][where[in_shard]]
        return tokens, shard == self._prefix_shard

    def prefixed(self, field: str, encode: Callable[[str], list[int]]) -> "TokenDataset":
        """A view whose streams put ``encode(value)`` before every document, ``value`` being the document's
        ``field`` in the index (``pack.index_fields`` copies fields there). Each distinct value is encoded
        once; the prefixes live in one extra in-memory shard."""
        if field not in self.index.column_names:
            raise TokenmillError(f"tokens: {self.path}/index.parquet has no {field!r} column; pack with "
                                 f"pack.index_fields: [{field}] (the run adds the metadata field itself)")
        values = sorted(set(self.index.column(field).to_pylist()))
        encoded = [np.asarray(encode(v), self.dtype) for v in values]
        if any(len(e) == 0 for e in encoded):
            raise TokenmillError(f"tokens: the metadata of field {field!r} encodes to no token for some value")
        lengths = np.array([len(e) for e in encoded], np.int64)
        starts = np.cumsum(lengths) - lengths
        view = copy.copy(self)
        view._prefix_shard = len(self._shards)
        view._shards = self._shards + [np.concatenate(encoded)]
        view._runs = {}
        for domain, docs in self._docs.items():
            shard, offset, length = _columns(docs, ("shard", "offset", "length"))
            value = pc.index_in(docs.column(field), value_set=pa.array(values)).to_numpy()
            both = lambda prefix, doc: np.stack([prefix, doc], axis=1).ravel()  # prefix, then its document
            view._runs[domain] = _runs(both(np.full(len(shard), view._prefix_shard), shard),
                                       both(starts[value], offset), both(lengths[value], length))
        return view


class TokenLoader:
    """Batches ``(x, y, domain_idx)`` by step; rank r of w gets rows [r*B, (r+1)*B) of each global batch.

    The mixture is ``domain_weights`` (one fixed phase; None = natural proportions) unless ``mixture``
    is given. ``metadata`` (a ``prefixed`` view of the dataset) feeds every global sequence before
    ``metadata_until``."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int,
        domain_weights: dict[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        mixture: ScheduledMixture | None = None,
        metadata: TokenDataset | None = None,
        metadata_until: int = 0,
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
        if mixture is None:
            weights = natural_weights(dataset) if domain_weights is None else normalise(domain_weights, self.domains)
            mixture = ScheduledMixture(self.domains, [(0, weights)], seed)
        if mixture.domains != self.domains:
            raise TokenmillError(f"loader: the mixture is over {mixture.domains}, the tokens have {self.domains}")
        self.mixture = mixture
        self.views = [dataset] if metadata is None else [dataset, metadata]
        self.metadata_until = metadata_until if metadata is not None else 0
        self._windows = np.array([[view.n_tokens(d) // (seq_len + 1) for d in self.domains] for view in self.views])
        used = np.any(np.stack(mixture.quotas) > 0, axis=0)  # domains some phase draws from
        starved = [d for d, u, n in zip(self.domains, used, self._windows.min(axis=0)) if u and n == 0]
        if starved:
            raise TokenmillError(
                f"loader: domain(s) {starved} have fewer tokens than one window of seq_len+1={seq_len + 1}; "
                "give them weight 0 in the mixture or use a shorter seq_len"
            )
        self._epoch_order = lru_cache(maxsize=8 * len(self.domains))(self._epoch_order_uncached)

    def rows(self, step: int) -> np.ndarray:
        """The global sequence indices of this rank's rows of batch ``step``: what masking and corruption
        are seeded by, so they do not depend on the world size."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return first + np.arange(self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``: x, y LongTensor [B, T] (y is x shifted by one; -1
        where it is a metadata prefix) and domain_idx LongTensor [B] (an index into ``domains``)."""
        g = self.rows(step)
        domain, k = self.mixture.draw(g)
        view = (g < self.metadata_until).astype(np.int64)  # 1: the metadata-prefixed stream
        window = self._window(view, domain, k)
        tokens = np.empty((self.batch_size, self.seq_len + 1), np.int64)
        prefix = np.zeros(tokens.shape, bool)
        span = np.arange(self.seq_len + 1)
        for v, d in {(int(v), int(d)) for v, d in zip(view, domain)}:
            rows = (view == v) & (domain == d)
            positions = window[rows, None] * (self.seq_len + 1) + span
            tokens[rows], prefix[rows] = self.views[v].read(self.domains[d], positions)
        targets = np.where(prefix[:, 1:], -1, tokens[:, 1:])
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets), torch.from_numpy(domain)

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

    def _window(self, view: np.ndarray, domain: np.ndarray, k: np.ndarray) -> np.ndarray:
        epoch, j = np.divmod(k, self._windows[view, domain])
        window = np.empty_like(k)
        for v, d, e in {(int(v), int(d), int(e)) for v, d, e in zip(view, domain, epoch)}:
            rows = (view == v) & (domain == d) & (epoch == e)
            window[rows] = self._epoch_order(v, d, e)[j[rows]]
        return window

    def _epoch_order_uncached(self, view: int, domain: int, epoch: int) -> np.ndarray:
        # Seeded by the domain's name, not its position, so its order survives adding other domains.
        name = zlib.crc32(self.domains[domain].encode())
        stream = [1] if view == 0 else [3]  # the plain stream keeps the seeds it always had
        return np.random.default_rng([self.seed, *stream, name, epoch]).permutation(self._windows[view, domain])


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
            tokens = torch.from_numpy(dataset.read(domain, chosen[:, None] * (seq_len + 1) + span)[0])
            windows[domain] = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return windows


def natural_weights(dataset: TokenDataset) -> np.ndarray:
    """Each domain's share of the training tokens: the mixture when none is given."""
    weights = np.array([dataset.n_tokens(d) for d in dataset.domains], np.float64)
    return weights / weights.sum()


def _columns(table, names: tuple[str, ...]) -> list[np.ndarray]:
    return [table.column(c).to_numpy() for c in names]


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
