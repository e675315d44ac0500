"""Related-document order: the In-Context Pretraining path (Shi et al. 2024) through a domain's documents.

Packing documents in their natural order fills a context window with unrelated texts, so attention
across a document boundary learns little. In-Context Pretraining instead lays documents out along a
path that steps from each document to a similar one, so a window holds related texts and the model is
rewarded for reading its whole context. The path is built greedily, as the paper does: start at an
unvisited document, step to its most similar unvisited neighbour among its ``k`` nearest, and when
all of those are used start afresh at a random unvisited document. Every document is used exactly once.

Similarity is cosine between document embeddings (``documents.embed``), or the fraction of equal
MinHash values of the documents' word sets (an estimate of their Jaccard similarity that needs no
model). A document's first ``MAX_CHARS`` characters stand for it either way, as they do for the
embedders, which bounds the time and memory spent per document.

The neighbours are found by brute force, in row blocks of the n × n similarity matrix, O(n²·d) for n
documents of one domain and embedding width d (O(n²·``MINHASH_PERM``) compares for MinHash), plus O(n)
per row to pick its k best. On 2 cores that is 2 s at 10⁴ documents (3.5 s for MinHash) and a hundred
times that at 10⁵, where a domain is better split (``pack.domain_field: cluster``) than ordered whole.
The path itself is O(n·k). Ties go to the lower index and the chain starts are seeded, so the order is
a function of the texts and the seed.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import pyarrow as pa

from tokenmill.curate.minhash import minhash_signatures
from tokenmill.documents.embed import Backend, embed_texts
from tokenmill.documents.hashing import word_hashes

MAX_CHARS = 2000
MINHASH_PERM = 64  # similarity in steps of 1/64; the estimate's sd, sqrt(s(1-s)/64), is at most 0.0625
_BLOCK_CELLS = 1 << 23  # similarity cells held at once (32 MiB of float32)


def related_order(
    texts: list[str],
    *,
    order_by: Literal["embedding", "minhash"] = "embedding",
    backend: Backend = "auto",
    neighbors: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """A permutation of ``range(len(texts))`` that walks from each document to a similar one."""
    n = len(texts)
    if n < 3:
        return np.arange(n)
    if order_by == "embedding":
        similarity = cosine(embed_texts(texts, backend, max_chars=MAX_CHARS, seed=seed))
    else:
        similarity = partial_agreement(np.ascontiguousarray(minhash_texts(texts, seed).T))
    return greedy_path(nearest_neighbors(n, min(neighbors, n - 1), similarity), seed)


def minhash_texts(texts: list[str], seed: int) -> np.ndarray:
    """``(len(texts), MINHASH_PERM)`` uint32 MinHash signatures of each text's set of lowercased words.

    Single words, not the word 5-grams of near-duplicate detection: documents on one topic share
    vocabulary far more often than they share phrases, so the 5-gram Jaccard of related but distinct
    documents is almost always 0 and would rank nothing.
    """
    a, b = np.random.default_rng(seed).integers(
        0, np.iinfo(np.uint64).max, size=(2, MINHASH_PERM), dtype=np.uint64, endpoint=True
    )
    words, offsets = word_hashes(pa.array([text[:MAX_CHARS] for text in texts], pa.large_string()))
    return minhash_signatures(words, offsets, a, b)


def cosine(vectors: np.ndarray) -> Callable[[slice], np.ndarray]:
    """Similarity of a block of rows to every row: the dot product, a cosine since the rows are unit length."""
    return lambda rows: vectors[rows] @ vectors.T


def partial_agreement(signatures_by_position: np.ndarray) -> Callable[[slice], np.ndarray]:
    """Similarity of a block of rows to every row: the fraction of signature positions that agree.

    ``signatures_by_position`` is ``(MINHASH_PERM, n)``, so each position's values are contiguous.
    """
    positions, n = signatures_by_position.shape

    def similarity(rows: slice) -> np.ndarray:
        block = signatures_by_position[:, rows]
        agree = np.zeros((block.shape[1], n), np.uint8)
        for values, mine in zip(signatures_by_position, block):
            agree += mine[:, None] == values
        return agree.astype(np.float32) / positions

    return similarity


def nearest_neighbors(n: int, k: int, similarity: Callable[[slice], np.ndarray]) -> np.ndarray:
    """``(n, k)`` indices of each row's ``k`` most similar other rows, most similar first.

    ``similarity(rows)`` gives a block of the n × n matrix. Ties go to the lower index: a plain
    ``argpartition`` would settle them by the partition's pivots, and documents with equal similarity
    (duplicates, or MinHash's coarse 1/64 steps) are common.
    """
    neighbors = np.empty((n, k), np.int64)
    step = max(1, _BLOCK_CELLS // n)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        block = similarity(rows).astype(np.float32, copy=False)
        block[np.arange(block.shape[0]), np.arange(rows.start, rows.stop)] = -np.inf
        neighbors[rows] = _top_k(block, k)
    return neighbors


def _top_k(block: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's ``k`` largest values, largest first, ties to the lower column; O(n) a row."""
    kth = np.partition(block, block.shape[1] - k, axis=1)[:, -k, None]
    chosen = block >= kth
    crowded = np.flatnonzero(chosen.sum(axis=1) > k)  # rows with ties across the k-th place
    if len(crowded):
        rows, bar = block[crowded], kth[crowded]
        tied = rows == bar
        room = k - (rows > bar).sum(axis=1, keepdims=True)
        chosen[crowded] = (rows > bar) | (tied & (np.cumsum(tied, axis=1) <= room))
    columns = np.nonzero(chosen)[1].reshape(len(block), k)
    by_value = np.argsort(-np.take_along_axis(block, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, by_value, axis=1)


def greedy_path(neighbors: np.ndarray, seed: int) -> np.ndarray:
    """Visit every row once: step to the first unvisited of the current row's neighbours, else restart
    at the next unvisited row of a seeded random permutation."""
    n = len(neighbors)
    candidates = neighbors.tolist()  # a Python loop over small lists beats numpy calls per step
    starts = iter(np.random.default_rng(seed).permutation(n).tolist())
    visited = bytearray(n)
    path = []
    current = next(starts, None)
    while current is not None:
        visited[current] = 1
        path.append(current)
        current = next((j for j in candidates[current] if not visited[j]), None)
        if current is None:
            current = next((s for s in starts if not visited[s]), None)
    return np.array(path, np.int64)
