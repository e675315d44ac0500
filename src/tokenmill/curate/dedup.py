"""Exact and line-level deduplication, and what every duplicate-removing step shares: which document
of a group of duplicates is kept (``keep``), and the record, on each removed document, of the one kept
in its place.

Ties between candidates for keeping, and the whole choice under ``keep: first``, go by corpus order
(shard order, then row order), the order in which ``fit_reduce`` receives the shards' partial results.
Line dedup keeps each line's first occurrence in that order.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.hashing import hash_strings, mix64, normalized_text_hashes, sequence_hashes, word_hashes
from tokenmill.documents.schema import put_column, with_reason

# Kinds of newest_field value, as bits: numbers and dates do not compare, so one field must not mix them.
_NUMBER, _DATE = 1, 2


class KeepParams(StepParams):
    """Parameters of a step that keeps one document per group of duplicates."""

    keep: Literal["first", "longest", "newest"] = Field(
        "first", description="Which document of a group of duplicates survives: 'first' in corpus order "
        "(shard, then row), 'longest' (most characters) or 'newest' (greatest newest_field). Documents "
        "lacking newest_field lose to those that have it; ties go by corpus order.",
    )
    newest_field: str | None = Field(
        None, description="With keep: newest, where each document's date is: 'meta.<key>', a key of the "
        "JSON object in the meta column (source fields the reader kept; 'meta.a.b' for nested objects), "
        "or the name of a column. Values are ISO 8601 dates or times ('2024-05-03', "
        "'2024-05-03T10:00:00Z'; UTC when no offset is given), timestamp or date columns, or numbers "
        "(a Unix time, a version); one field must not mix numbers and dates. Absent, null or '': missing.",
    )

    @model_validator(mode="after")
    def _newest_needs_a_field(self) -> "KeepParams":
        if (self.keep == "newest") != (self.newest_field is not None):
            raise ValueError(
                f"{self.step}: keep: newest needs newest_field (where each document's date is, e.g. "
                "meta.date), and newest_field is used only with keep: newest"
            )
        return self


def _recency(value: Any) -> tuple[float, int] | None:
    """A newest_field value as (number to compare, kind); NaN when missing, None when not a date or number."""
    if value is None or value == "":
        return math.nan, 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), _NUMBER
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time())
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp(), _DATE


def _field_values(table: pa.Table, field: str) -> list:
    """Each row's ``field``: a column, or with ``meta.`` a (nested) key of the meta JSON."""
    if not field.startswith("meta."):
        if field not in table.column_names:
            raise TokenmillError(
                f"newest_field {field!r} is no column (columns: {', '.join(table.column_names)}); "
                "name a key of the meta JSON as meta.<key>"
            )
        return table[field].to_pylist()
    values = []
    for meta in table["meta"].to_pylist():
        value = json.loads(meta) if meta else None
        for key in field.split(".")[1:]:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return values


def best_per_group(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each row, the row its group keeps: the greatest key (NaN least), ties the earliest.

    ``groups`` labels each row with an integer in ``[0, len(groups))``.
    """
    order = np.lexsort((-np.nan_to_num(keys, nan=-np.inf), groups))  # stable: ties stay in corpus order
    sorted_groups = groups[order]
    head = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    winner = np.empty(len(groups), np.int64)
    winner[sorted_groups[head]] = order[head]
    return winner[groups]


class DuplicateStep(Step):
    """A step that, after a whole-corpus fit, removes documents duplicating a kept one.

    The fitted state is three aligned Arrow arrays, the removed ids, their kept twins' ids and their
    similarity to them, so a worker holds only the duplicates and ``process`` is one vectorised
    ``index_in`` per shard. Each removed row gets a ``duplicate_of`` column naming the document kept in
    its place and a ``similarity`` column: the Jaccard similarity of the two documents' shingle sets
    (1.0 for exact duplicates, estimated from the signatures for near ones; null when not known).
    """

    reason: ClassVar[str]

    def keep_keys(self, table: pa.Table) -> tuple[np.ndarray | None, int]:
        """Each row's rank under the keep policy (greater wins, NaN loses; None for 'first') and the
        kinds of newest_field value seen, for ``keepers`` to check across shards."""
        p = self.params
        if p.keep == "first":
            return None, 0
        if p.keep == "longest":
            return pc.utf8_length(table["text"]).to_numpy().astype(np.float64), 0
        keys, kinds = np.empty(table.num_rows), 0
        for row, (doc_id, value) in enumerate(zip(table["id"].to_pylist(), _field_values(table, p.newest_field))):
            recency = _recency(value)
            if recency is None:
                raise TokenmillError(
                    f"{self.name}: newest_field {p.newest_field} of document {doc_id!r} is {value!r}, neither "
                    "a number nor an ISO 8601 date (like 2024-05-03 or 2024-05-03T10:00:00Z)"
                )
            keys[row], kind = recency
            kinds |= kind
        return keys, kinds

    def keepers(self, groups: np.ndarray, parts: list) -> np.ndarray:
        """For each corpus row, the row kept in its place among its group (``parts`` carry ``keys``, ``kinds``)."""
        kinds = 0
        for part in parts:
            kinds |= part.kinds
        if kinds == _NUMBER | _DATE:
            raise TokenmillError(
                f"{self.name}: newest_field {self.params.newest_field} holds numbers in some documents and "
                "dates in others, which do not compare; make it one or the other"
            )
        if self.params.keep == "first":
            return best_per_group(groups, np.zeros(len(groups)))
        return best_per_group(groups, np.concatenate([p.keys for p in parts] or [np.empty(0)]))

    def _remember(self, parts: list, duplicate_rows: np.ndarray, kept_rows: np.ndarray,
                  similarity: np.ndarray | None) -> None:
        """Store the duplicates found over ``parts`` (each with an ``ids`` array), by corpus-order row."""
        ids = pa.concat_arrays([p.ids for p in parts]) if parts else pa.array([], pa.string())
        self.removed_ids = ids.take(pa.array(duplicate_rows, pa.int64()))
        self.kept_twins = ids.take(pa.array(kept_rows, pa.int64()))
        self.similarities = pa.array(similarity, pa.float64()) if similarity is not None else pa.nulls(
            len(duplicate_rows), pa.float64())

    def process(self, table: pa.Table) -> StepResult:
        position = pc.index_in(table["id"], value_set=self.removed_ids)
        is_duplicate = pc.is_valid(position)
        found = pc.drop_null(position).combine_chunks()
        removed = with_reason(table.filter(is_duplicate), self.reason, self.name)
        removed = removed.append_column("duplicate_of", self.kept_twins.take(found))
        removed = removed.append_column("similarity", self.similarities.take(found))
        return StepResult(table.filter(pc.invert(is_duplicate)), removed)


class _ExactPart(NamedTuple):
    ids: pa.Array
    hashes: np.ndarray
    keys: np.ndarray | None  # keep policy ranks (see DuplicateStep.keep_keys)
    kinds: int


class ExactDedup(DuplicateStep):
    """Remove documents whose (normalised) text equals another's, keeping one per group."""

    reason = "exact_duplicate"

    class Params(KeepParams):
        step: Literal["exact_dedup"] = "exact_dedup"
        normalize: bool = Field(
            True,
            description="Compare texts lowercased with whitespace runs collapsed and ends trimmed "
            "(false: byte-identical texts only).",
        )

    def fit_map(self, table: pa.Table) -> _ExactPart:
        text = table["text"]
        hashes = normalized_text_hashes(text) if self.params.normalize else hash_strings(text)
        return _ExactPart(table["id"].combine_chunks(), hashes, *self.keep_keys(table))

    def fit_reduce(self, parts: list[_ExactPart]) -> None:
        hashes = np.concatenate([p.hashes for p in parts]) if parts else np.empty(0, np.uint64)
        _, groups = np.unique(hashes, return_inverse=True)
        keeper = self.keepers(groups, parts)
        duplicates = np.flatnonzero(keeper != np.arange(len(hashes)))
        # Equal after normalising means equal word sequences: every word n-gram is shared.
        self._remember(parts, duplicates, keeper[duplicates], np.ones(len(duplicates)))


class _LinePart(NamedTuple):
    doc_keys: np.ndarray  # hash of each row's id
    line_hashes: np.ndarray  # of the candidate lines, in row then line order
    line_rows: np.ndarray
    line_numbers: np.ndarray


def _line_key(doc_keys: np.ndarray, line_numbers: np.ndarray) -> np.ndarray:
    """One uint64 naming (document, line number), for membership tests against the fitted state."""
    return mix64(doc_keys ^ mix64(line_numbers.astype(np.uint64) + np.uint64(1)))


class LineDedup(Step):
    """CCNet-style line deduplication: drop lines already seen in an earlier document.

    Lines are compared by their words (case, punctuation and spacing ignored, as CCNet normalises).
    A line repeated inside the document where it first appears is kept; only its copies in later
    documents go. The fitted state is the set of (document, line number) pairs to drop, so ``process``
    needs no hashing of lines, only a split.
    """

    class Params(StepParams):
        step: Literal["line_dedup"] = "line_dedup"
        min_line_chars: int = Field(
            20, ge=1, description="Only lines with at least this many characters (whitespace trimmed) "
            "are deduplicated; shorter ones (braces, blank lines, short headings) are always kept.",
        )
        min_doc_chars: int = Field(
            50, ge=1, description="A document that lost lines and keeps fewer than this many characters "
            "(whitespace trimmed) is removed with reason 'line_dedup_empty'.",
        )

    def _candidate_lines(self, table: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
        """Split texts into lines; return lines, each line's row and number, and which are candidates."""
        lines = pc.split_pattern(table["text"].combine_chunks(), "\n")
        flat = lines.flatten()
        rows = pc.list_parent_indices(lines).to_numpy()
        numbers = np.arange(len(flat)) - np.asarray(lines.offsets)[rows]
        long_enough = pc.utf8_length(pc.utf8_trim_whitespace(flat)).to_numpy() >= self.params.min_line_chars
        return flat, rows, numbers, long_enough

    def fit_map(self, table: pa.Table) -> _LinePart:
        flat, rows, numbers, candidate = self._candidate_lines(table)
        words, word_offsets = word_hashes(flat.filter(pa.array(candidate)))
        has_words = np.diff(word_offsets) > 0
        line_hashes = sequence_hashes(words, word_offsets)[has_words]
        picked = np.flatnonzero(candidate)[has_words]
        return _LinePart(hash_strings(table["id"]), line_hashes, rows[picked].astype(np.int32),
                         numbers[picked].astype(np.int32))

    def fit_reduce(self, parts: list[_LinePart]) -> None:
        row_base = np.cumsum([0] + [len(p.doc_keys) for p in parts])
        doc_keys = np.concatenate([p.doc_keys for p in parts] or [np.empty(0, np.uint64)])
        docs = np.concatenate([p.line_rows + base for p, base in zip(parts, row_base)] or [np.empty(0, int)])
        hashes = np.concatenate([p.line_hashes for p in parts] or [np.empty(0, np.uint64)])
        numbers = np.concatenate([p.line_numbers for p in parts] or [np.empty(0, int)])
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        later = docs[first][inverse] != docs
        self.removed_lines = np.unique(_line_key(doc_keys[docs[later]], numbers[later]))

    def process(self, table: pa.Table) -> StepResult:
        flat, rows, numbers, candidate = self._candidate_lines(table)
        drop = candidate & np.isin(_line_key(hash_strings(table["id"])[rows], numbers), self.removed_lines)
        dropped_per_doc = np.bincount(rows[drop], minlength=table.num_rows)
        kept_per_doc = np.bincount(rows[~drop], minlength=table.num_rows)
        kept_lines = pa.LargeListArray.from_arrays(np.r_[0, np.cumsum(kept_per_doc)], flat.filter(pa.array(~drop)))
        text = pc.binary_join(kept_lines, pa.scalar("\n", kept_lines.type.value_type))
        too_short = pc.utf8_length(pc.utf8_trim_whitespace(text)).to_numpy() < self.params.min_doc_chars
        emptied = pa.array((dropped_per_doc > 0) & too_short)
        kept = put_column(table, "text", text).filter(pc.invert(emptied))
        removed = with_reason(table.filter(emptied), "line_dedup_empty", self.name)  # as it was, for inspection
        counters = {"lines_removed": int(drop.sum()), "docs_with_lines_removed": int((dropped_per_doc > 0).sum())}
        return StepResult(kept, removed, counters)
