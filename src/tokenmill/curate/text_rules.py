"""Batch primitives of the rule steps (gopher, c4, fineweb): a rule is an Arrow kernel over the whole
batch plus a numpy reduction per document. Kept apart from any one paper's rules so that each rule
module holds only its own definitions.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def first_failure(n_rows: int, rules: Iterable[tuple[str, np.ndarray | None]]) -> np.ndarray:
    """Each row's reason is the first rule (in the given order) it fails; ``None`` marks a disabled rule."""
    reasons = np.full(n_rows, "", dtype=object)
    for reason, failed in rules:
        if failed is not None:
            reasons[(reasons == "") & failed] = reason
    return reasons


def staged_reasons(text: pa.Array, stages: Iterable[Callable[[pa.Array], np.ndarray]]) -> np.ndarray:
    """Run rule stages in order, each only over the rows every earlier stage kept, so the costly
    statistics of late stages are never computed for documents already rejected."""
    reasons = np.full(len(text), "", dtype=object)
    for stage in stages:
        alive = np.flatnonzero(reasons == "")
        if len(alive) == 0:
            break
        reasons[alive] = stage(text if len(alive) == len(text) else text.take(pa.array(alive)))
    return reasons


def split_rows(texts: pa.Array, pattern: str | None = None) -> tuple[pa.Array, np.ndarray]:
    """Split every row on a regex (``None``: whitespace, dropping empty tokens) into one flat array of
    pieces, returned with the row each piece came from."""
    if pattern is None:
        lists = pc.utf8_split_whitespace(texts)
    else:
        lists = pc.split_pattern_regex(texts, pattern)
    pieces, rows = pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy()
    if pattern is None:
        nonempty = pc.greater(pc.binary_length(pieces), 0)
        pieces, rows = pieces.filter(nonempty), rows[nonempty.to_numpy(zero_copy_only=False)]
    return pieces, rows


def group_ids(values: pa.Array | np.ndarray) -> np.ndarray:
    """Dense ids in order of first appearance (a hash table in Arrow, no sort)."""
    return pc.dictionary_encode(pa.array(values)).indices.to_numpy()


def is_repeat(ids: np.ndarray) -> np.ndarray:
    """True where an id already appeared earlier. Ids from ``group_ids`` grow by one at each new value,
    so an element is new exactly when it exceeds every id before it."""
    seen_max = np.maximum.accumulate(ids)
    return ids <= np.concatenate(([-1], seen_max[:-1]))


def repeated_pieces(pieces: pa.Array, rows: np.ndarray) -> np.ndarray:
    """True for each piece equal to an earlier piece of the same row."""
    keys = (rows.astype(np.int64) << 32) | group_ids(pieces).astype(np.int64)
    return is_repeat(group_ids(keys))


def per_row(rows: np.ndarray, n_rows: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(rows, weights=weights, minlength=n_rows)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio that is 0 where the denominator is 0 (an empty document has no repetition)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def count(texts: pa.Array, pattern: str, *, regex: bool = True) -> np.ndarray:
    kernel = pc.count_substring_regex if regex else pc.count_substring
    return kernel(texts, pattern).to_numpy()


def at_most(value: np.ndarray, limit: float | None) -> np.ndarray | None:
    """Failure mask of ``value > limit``; None when the rule is disabled."""
    return None if limit is None else value > limit


def at_least(value: np.ndarray, limit: float | None) -> np.ndarray | None:
    """Failure mask of ``value < limit``; None when the rule is disabled."""
    return None if limit is None else value < limit
