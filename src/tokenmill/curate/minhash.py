"""Near-duplicate removal by MinHash + LSH (Broder 1997; the scheme of datatrove and NeMo Curator).

A document is the set of its word n-grams (shingles). Its MinHash signature keeps, for each of
``num_perm`` random hash functions, the smallest hash over that set; two signatures agree at a
position with probability equal to the sets' Jaccard similarity s. LSH cuts the signature into
``bands`` bands of ``rows`` values, and documents that share a whole band become candidates, which
happens with probability (``detection_probability``)

    P(s) = 1 - (1 - s**rows) ** bands,

an S-curve that rises around s ≈ (1/bands)**(1/rows). More rows per band move it right: fewer
unrelated candidates (false positives), more missed duplicates (false negatives); more bands move it
left. FineWeb's 14 bands × 8 rows finds only 92% of pairs at s = 0.8; the default 16 × 7, same 112
hashes and cost, finds 98% (and 75% at s = 0.7, 12% at s = 0.5). Candidates are then verified: the
fraction of agreeing signature positions estimates s with standard deviation sqrt(s(1-s)/num_perm)
(0.038 at s = 0.8), so a pair passes at ``verify_threshold`` 0.7 with probability 0.996 when s = 0.8,
while band collisions between unrelated documents (s ≲ 0.5) fail. Verifying at 0.8 itself would
drop about half the pairs whose true s is 0.8. Candidate pairs are joined into clusters (union-find),
one document per cluster is kept (``keep``), and every other member is removed with ``duplicate_of``
naming it and ``similarity`` its estimated Jaccard to it.

Clusters chain: when A ~ B and B ~ C, C joins A's cluster even if C is not itself near A. We keep
these cluster semantics, as datatrove and NeMo Curator do: a recipe then removes what those tools
remove, and one document stands for each family of versions (crediting C to a kept document it is
near would mean keeping C, a second member of the family). So that a chain is not hidden,
``similarity`` is C's own estimated Jaccard to the kept document, below ``verify_threshold`` for a
chained member, and the counter ``chained_duplicates`` counts such removals.

Hashing is vectorised over a whole batch: every shingle is hashed once to 64 bits from its words'
hashes, then each of the ``num_perm`` functions is h(x) = ((a·x + b) mod 2⁶⁴) >> 32 on the shingle's
top 32 bits (Dietzfelbinger's multiply-add-shift: strongly universal like (a·x + b) mod p, without the
division numpy does slowly), with per-document minima from ``np.minimum.reduceat``. The fit keeps
per-document state only (band hashes, and signatures when verifying), never texts.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from tokenmill.curate.base import StepResult
from tokenmill.curate.dedup import DuplicateStep, KeepParams
from tokenmill.documents.hashing import mix64, ngram_hashes, odd_constants, word_hashes

_CHUNK = 1 << 15  # shingles per hashing pass: the working arrays stay in cache (2.5× faster than one pass)
_BATCH_ROWS = 1024  # documents tokenised at once in fit_map: bounds memory on large shards
_PAIRS_PER_CHECK = 1 << 16  # candidate pairs whose signatures are compared at once


def detection_probability(jaccard: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that two documents with this Jaccard similarity share a band: 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(jaccard, float) ** rows) ** bands


def minhash_signatures(shingles: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(texts, len(a))`` uint32 signature minima; a text without shingles gets all 0xFFFFFFFF.

    Shingles are hashed in cache-sized chunks; a text that spans chunks gets one partial minimum per
    chunk ("piece"), and the pieces of a text are merged at the end.
    """
    x = shingles >> np.uint64(32)
    nonempty = np.diff(offsets) > 0
    text_starts = offsets[:-1][nonempty]
    piece_starts = np.union1d(text_starts, np.arange(0, len(x), _CHUNK))
    pieces = np.empty((len(piece_starts), len(a)), np.uint32)
    buffer = np.empty(min(_CHUNK, len(x)), np.uint64)
    for chunk in range(0, len(x), _CHUNK):
        values = x[chunk : chunk + _CHUNK]
        hashed = buffer[: len(values)]
        lo, hi = np.searchsorted(piece_starts, [chunk, chunk + _CHUNK])
        local_starts = piece_starts[lo:hi] - chunk
        for k in range(len(a)):
            np.multiply(values, a[k], out=hashed)
            hashed += b[k]
            hashed >>= np.uint64(32)
            pieces[lo:hi, k] = np.minimum.reduceat(hashed, local_starts)
    signatures = np.full((len(nonempty), len(a)), 0xFFFFFFFF, np.uint32)
    if len(text_starts):
        signatures[nonempty] = np.minimum.reduceat(pieces, np.searchsorted(piece_starts, text_starts), axis=0)
    return signatures


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(texts, bands)`` uint64: one hash of each band's ``rows`` signature values."""
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    return mix64((grouped * odd_constants(rows, salt=2)).sum(axis=2, dtype=np.uint64))


def band_candidates(bands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows sharing a band hash: each row paired with its bucket's first row."""
    firsts, seconds = [], []
    for column in bands.T:
        order = np.argsort(column, kind="stable")
        new_bucket = np.r_[True, column[order][1:] != column[order][:-1]]
        leader = order[np.flatnonzero(new_bucket)[np.cumsum(new_bucket) - 1]]
        firsts.append(leader[~new_bucket])
        seconds.append(order[~new_bucket])
    pairs = np.unique(np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def estimated_jaccard(signatures: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Fraction of equal signature positions for each pair: an unbiased estimate of their Jaccard."""
    chunks = [
        (signatures[first[i : i + _PAIRS_PER_CHECK]] == signatures[second[i : i + _PAIRS_PER_CHECK]]).mean(axis=1)
        for i in range(0, len(first), _PAIRS_PER_CHECK)
    ]
    return np.concatenate(chunks) if chunks else np.empty(0)


def connected_components(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Union-find over edges, vectorised: each node's label is the smallest node of its component.

    Each round hooks the larger root of every unmerged edge under the smaller, then pointer-jumps until
    every node points at a root. Roots only ever move down, so the last root is the component minimum.
    """
    parent = np.arange(count)
    while True:
        root_a, root_b = parent[first], parent[second]
        if np.array_equal(root_a, root_b):
            return parent
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while not np.array_equal(grandparent := parent[parent], parent):
            parent = grandparent


class _MinHashPart(NamedTuple):
    ids: pa.Array
    keys: np.ndarray | None  # keep policy ranks (see DuplicateStep.keep_keys)
    kinds: int
    bands: np.ndarray  # (docs, bands) uint64
    has_shingles: np.ndarray  # docs without words are never candidates
    signatures: np.ndarray | None  # (docs, num_perm) uint32, kept only when verifying


class MinHashDedup(DuplicateStep):
    """Remove near-duplicate documents (word n-gram Jaccard), keeping one per cluster."""

    reason = "near_duplicate"

    class Params(KeepParams):
        step: Literal["minhash_dedup"] = "minhash_dedup"
        ngram: int = Field(5, ge=1, description="Words per shingle (word n-gram).")
        num_perm: int = Field(112, ge=1, description="Hash functions per signature; must equal bands × rows.")
        bands: int = Field(16, ge=1, description="LSH bands; more bands find less similar pairs (see module doc).")
        rows: int = Field(7, ge=1, description="Signature values per band; more rows make candidates stricter.")
        verify: bool = Field(
            True, description="Check each candidate pair's Jaccard estimate from the signatures before "
            "joining it to a cluster (raises precision; costs keeping signatures during the fit, which "
            "also give each removed document's similarity: null without them).",
        )
        verify_threshold: float = Field(
            0.7, gt=0.0, le=1.0, description="Minimum estimated Jaccard for a verified pair; set it about "
            "2.5 standard deviations (sqrt(s(1-s)/num_perm)) below the similarity you must catch.",
        )
        seed: int = Field(0, ge=0, description="Seed of the hash functions (all shards share it).")

        @model_validator(mode="after")
        def _bands_cover_signature(self) -> "MinHashDedup.Params":
            if self.bands * self.rows != self.num_perm:
                raise ValueError(
                    f"minhash_dedup: bands × rows must equal num_perm, got {self.bands} × {self.rows} = "
                    f"{self.bands * self.rows} ≠ {self.num_perm}; change one of the three"
                )
            return self

    def hash_functions(self) -> tuple[np.ndarray, np.ndarray]:
        """Multipliers ``a`` and offsets ``b`` of the ``num_perm`` functions ((a·x + b) mod 2⁶⁴) >> 32."""
        a, b = np.random.default_rng(self.params.seed).integers(
            0, np.iinfo(np.uint64).max, size=(2, self.params.num_perm), dtype=np.uint64, endpoint=True
        )
        return a, b

    def fit_map(self, table: pa.Table) -> _MinHashPart:
        a, b = self.hash_functions()
        signatures, has_shingles = [], []
        for batch in table.select(["text"]).to_batches(max_chunksize=_BATCH_ROWS):
            shingles, offsets = ngram_hashes(*word_hashes(batch.column("text")), self.params.ngram)
            signatures.append(minhash_signatures(shingles, offsets, a, b))
            has_shingles.append(np.diff(offsets) > 0)
        signatures = np.concatenate(signatures or [np.empty((0, self.params.num_perm), np.uint32)])
        keys, kinds = self.keep_keys(table)
        return _MinHashPart(
            ids=table["id"].combine_chunks(),
            keys=keys,
            kinds=kinds,
            bands=band_hashes(signatures, self.params.bands, self.params.rows),
            has_shingles=np.concatenate(has_shingles or [np.empty(0, bool)]),
            signatures=signatures if self.params.verify else None,
        )

    def fit_reduce(self, parts: list[_MinHashPart]) -> None:
        p = self.params
        count = sum(len(q.ids) for q in parts)
        usable = np.flatnonzero(np.concatenate([q.has_shingles for q in parts] or [np.empty(0, bool)]))
        bands = np.concatenate([q.bands for q in parts] or [np.empty((0, p.bands), np.uint64)])
        first, second = (usable[side] for side in band_candidates(bands[usable]))
        signatures = np.concatenate([q.signatures for q in parts]) if p.verify and parts else None
        if signatures is not None and len(first):
            similar = estimated_jaccard(signatures, first, second) >= p.verify_threshold
            first, second = first[similar], second[similar]
        keeper = self.keepers(connected_components(count, first, second), parts)
        duplicates = np.flatnonzero(keeper != np.arange(count))
        similarity = None if signatures is None else estimated_jaccard(signatures, duplicates, keeper[duplicates])
        self._remember(parts, duplicates, keeper[duplicates], similarity)

    def process(self, table: pa.Table) -> StepResult:
        """Remove duplicates, counting chained ones (see module doc) so that run stats show them."""
        result = super().process(table)
        if self.params.verify:
            chained = pc.less(result.removed["similarity"], self.params.verify_threshold)
            result.counters["chained_duplicates"] = pc.sum(chained).as_py() or 0
        return result
