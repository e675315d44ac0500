"""DSIR (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling").

Each document is a bag of hashed word unigrams and bigrams (``num_buckets`` buckets, 10,000 as in the
paper). Two bag-of-n-grams distributions are estimated with add-``smoothing`` (Laplace) counts: the
target's, from a ``TargetSet``, and the raw pool's, from every pool document. A document's log
importance weight, its score, is ``log p_target(x) - log p_raw(x)``, summed over its n-grams. Selection
samples *without replacement* in proportion to the weights by Gumbel top-k: rank by ``score + G`` with
``G`` standard Gumbel noise drawn from the document's id hash (reproducible, independent of sharding),
and keep the best up to the ``keep`` rule's token budget or document count.

Featurisation is vectorised over the batch: words come from ``documents.hashing.word_hashes``, bigram hashes
are mixed from neighbouring word hashes in numpy, and per-document sums are one ``bincount``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import Field

from tokenmill import TokenmillError
from tokenmill.documents.hashing import mix64, word_hashes
from tokenmill.select.base import ScoreParams, ScoreStep, TargetSet, TextSample, id_keys, merge_samples, \
    sample_rows

_BIGRAM_SALT = np.uint64(0x9E3779B97F4A7C15)


def ngram_buckets(texts: pa.Array | pa.ChunkedArray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashed unigram and bigram features: ``(buckets, rows)``, one entry per n-gram occurrence."""
    words, offsets = word_hashes(texts)
    counts = np.diff(offsets)
    rows = np.repeat(np.arange(len(counts)), counts)
    same_doc = rows[:-1] == rows[1:]  # a bigram never spans two documents
    bigrams = mix64(mix64(words[:-1][same_doc] ^ _BIGRAM_SALT) + words[1:][same_doc])
    buckets = np.concatenate([words, bigrams]) % np.uint64(num_buckets)
    return buckets.astype(np.int64), np.concatenate([rows, rows[:-1][same_doc]])


def bucket_counts(texts: pa.Array | pa.ChunkedArray | list[str], num_buckets: int) -> np.ndarray:
    texts = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.large_string())
    return np.bincount(ngram_buckets(texts, num_buckets)[0], minlength=num_buckets).astype(np.float64)


def log_distribution(counts: np.ndarray, smoothing: float) -> np.ndarray:
    smoothed = counts + smoothing
    return np.log(smoothed) - np.log(smoothed.sum())


def gumbel_noise(keys: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise from uint64 keys: their top 53 bits as a uniform in (0, 1)."""
    uniform = ((keys >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return -np.log(-np.log(uniform))


class DsirParams(ScoreParams):
    step: Literal["dsir"] = "dsir"
    target: TargetSet = Field(description="Documents of the distribution to select towards.")
    num_buckets: int = Field(10_000, ge=2, description="Hash buckets of the unigram+bigram features (the "
                             "paper's 10,000).")
    smoothing: float = Field(1.0, gt=0, description="Pseudo-count added to every bucket of both "
                             "distributions (Laplace smoothing), so unseen n-grams have finite weight.")
    resample: bool = Field(True, description="Sample without replacement in proportion to the importance "
                           "weights (Gumbel top-k), as DSIR does; false: deterministic top-k by weight.")


class _CountPart(NamedTuple):
    raw: np.ndarray
    target: TextSample | None


class Dsir(ScoreStep):
    """Score = log importance weight of the document under target vs raw hashed n-gram distributions."""

    Params = DsirParams

    def __init__(self, params: DsirParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.log_ratio: np.ndarray | None = None

    @property
    def needs_model_fit(self) -> bool:
        return True

    def fit_model_map(self, table: pa.Table) -> _CountPart:
        target = self.params.target
        sample = (sample_rows(table, target.pool_mask(table), target.max_docs, self.params.seed)
                  if target.uses_pool else None)
        return _CountPart(bucket_counts(table["text"], self.params.num_buckets), sample)

    def fit_model_reduce(self, parts: list[_CountPart]) -> None:
        target, buckets = self.params.target, self.params.num_buckets
        texts = target.read_sources(self.params.seed) + merge_samples(
            [p.target for p in parts if p.target is not None], target.max_docs)
        if not texts:
            raise TokenmillError(f"dsir: the target set is empty (sources {[s.path for s in target.sources]}, "
                                 f"domains {target.domains}, score_column {target.score_column!r} matched no "
                                 f"document); check `target`")
        raw = np.sum([p.raw for p in parts], axis=0) if parts else np.zeros(buckets)
        self.log_ratio = (log_distribution(bucket_counts(texts, buckets), self.params.smoothing)
                          - log_distribution(raw, self.params.smoothing))

    def score(self, table: pa.Table) -> np.ndarray:
        buckets, rows = ngram_buckets(table["text"], self.params.num_buckets)
        return np.bincount(rows, weights=self.log_ratio[buckets], minlength=table.num_rows)

    def selection_keys(self, table: pa.Table, scores: np.ndarray) -> np.ndarray:
        if not self.params.resample:
            return scores
        return scores + gumbel_noise(id_keys(table["id"], self.params.seed))
