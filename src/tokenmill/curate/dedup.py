"""Exact and line-level deduplication, and the vectorised text hashing every dedup step shares.

Hashes are 64-bit, so two different texts collide with probability about n²/2⁶⁵ over n texts
(3·10⁻⁶ at ten million documents). Long strings (documents, vocabulary words) go through
``hashlib.blake2b`` one call each, which is faster than any numpy byte loop for them; many short
sequences (lines, n-grams) are hashed in numpy from their words' hashes, never one Python call each.

Both steps keep the first occurrence in corpus order (shard order, then row order), the order in
which ``fit_reduce`` receives the shards' partial results.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tokenmill.curate.base import Step, StepParams, StepResult, register_step
from tokenmill.documents.schema import put_column, with_reason

_SPACE_BYTE = np.zeros(256, bool)
_SPACE_BYTE[[9, 10, 11, 12, 13, 32]] = True
# A word is a maximal run of ASCII letters, digits, "_" or non-ASCII bytes (so a multi-byte UTF-8
# character is never split); everything else (spaces, ASCII punctuation) separates words.
_WORD_BYTE = np.zeros(256, bool)
_WORD_BYTE[[*b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", *range(128, 256)]] = True


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_buffers(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes (uint8) and ``len + 1`` int64 offsets (from 0) of an Arrow string column, without copying bytes."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = strings.cast(pa.large_binary())
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.empty(0, np.uint8) if data_buffer is None else np.frombuffer(data_buffer, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def blake64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit BLAKE2b of each segment ``data[offsets[i]:offsets[i+1]]``."""
    view = memoryview(data)
    digests = b"".join(
        hashlib.blake2b(view[start:end], digest_size=8).digest()
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    )
    return np.frombuffer(digests, np.uint64).copy()


def hash_strings(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of each string, stable across processes and runs (unlike Python's ``hash``)."""
    return blake64(*string_buffers(strings))


def normalized_text_hashes(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash of each text lowercased, trimmed, with every run of ASCII whitespace made one space."""
    data, offsets = string_buffers(pc.utf8_trim_whitespace(pc.utf8_lower(texts)))
    space = _SPACE_BYTE[data]
    repeated = np.zeros_like(space)
    repeated[1:] = space[1:] & space[:-1]  # trimmed texts never start with a space
    keep = ~repeated
    kept_before = np.r_[0, np.cumsum(keep)]
    return blake64(np.where(space, np.uint8(32), data)[keep], kept_before[offsets])


def word_hashes(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Hash every lowercased word of every text: ``(hashes, offsets)``, text i's words at offsets[i]:offsets[i+1].

    Runs on the batch's bytes in numpy; only the batch's distinct words are hashed one by one.
    """
    data, offsets = string_buffers(pc.utf8_lower(texts))
    is_word = _WORD_BYTE[data]
    text_starts = offsets[:-1][offsets[:-1] < len(data)]
    text_ends = offsets[1:][offsets[1:] > 0] - 1
    first = is_word.copy()
    first[1:] &= ~is_word[:-1]
    first[text_starts] = is_word[text_starts]
    last = is_word.copy()
    last[:-1] &= ~is_word[1:]
    last[text_ends] = is_word[text_ends]
    starts, ends = np.flatnonzero(first), np.flatnonzero(last) + 1
    word_offsets = np.r_[0, np.cumsum(ends - starts)]
    words = pa.Array.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(word_offsets), pa.py_buffer(data[is_word])]
    ).dictionary_encode()
    hashes = hash_strings(words.dictionary)[words.indices.to_numpy()]
    return hashes, np.searchsorted(starts, offsets)


def sequence_hashes(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One order-sensitive 64-bit hash per segment ``values[offsets[i]:offsets[i+1]]`` of uint64 hashes."""
    counts = np.diff(offsets)
    position = np.arange(len(values)) - np.repeat(offsets[:-1], counts)
    terms = mix64(values + position.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    sums = np.zeros(len(counts), np.uint64)
    nonempty = counts > 0
    sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return mix64(sums ^ counts.astype(np.uint64))


class DuplicateStep(Step):
    """A step that, after a whole-corpus fit, removes documents duplicating a kept one.

    The fitted state is two aligned Arrow string arrays, the removed ids and their kept twins' ids, so
    a worker holds only the duplicates and ``process`` is one vectorised ``index_in`` per shard. Each
    removed row gets a ``duplicate_of`` column naming the document kept in its place.
    """

    reason: ClassVar[str]

    def _remember(self, parts: list, duplicate_rows: np.ndarray, kept_rows: np.ndarray) -> None:
        """Store the duplicates found over ``parts`` (each with an ``ids`` array), by corpus-order row."""
        ids = pa.concat_arrays([p.ids for p in parts]) if parts else pa.array([], pa.string())
        self.removed_ids = ids.take(pa.array(duplicate_rows, pa.int64()))
        self.kept_twins = ids.take(pa.array(kept_rows, pa.int64()))

    def process(self, table: pa.Table) -> StepResult:
        position = pc.index_in(table["id"], value_set=self.removed_ids)
        is_duplicate = pc.is_valid(position)
        twins = self.kept_twins.take(pc.drop_null(position).combine_chunks())
        removed = with_reason(table.filter(is_duplicate), self.reason, self.name)
        return StepResult(table.filter(pc.invert(is_duplicate)), removed.append_column("duplicate_of", twins))


class _ExactPart(NamedTuple):
    ids: pa.Array
    hashes: np.ndarray


@register_step
class ExactDedup(DuplicateStep):
    """Remove documents whose (normalised) text equals an earlier document's."""

    name = "exact_dedup"
    reason = "exact_duplicate"

    class Params(StepParams):
        step: Literal["exact_dedup"] = "exact_dedup"
        normalize: bool = Field(
            True,
            description="Compare texts lowercased with whitespace runs collapsed and ends trimmed "
            "(false: byte-identical texts only).",
        )

    def fit_map(self, table: pa.Table) -> _ExactPart:
        text = table["text"]
        hashes = normalized_text_hashes(text) if self.params.normalize else hash_strings(text)
        return _ExactPart(table["id"].combine_chunks(), hashes)

    def fit_reduce(self, parts: list[_ExactPart]) -> None:
        hashes = np.concatenate([p.hashes for p in parts]) if parts else np.empty(0, np.uint64)
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        keeper = first[inverse]
        duplicates = np.flatnonzero(keeper != np.arange(len(hashes)))
        self._remember(parts, duplicates, keeper[duplicates])


class _LinePart(NamedTuple):
    doc_keys: np.ndarray  # hash of each row's id
    line_hashes: np.ndarray  # of the candidate lines, in row then line order
    line_rows: np.ndarray
    line_numbers: np.ndarray


def _line_key(doc_keys: np.ndarray, line_numbers: np.ndarray) -> np.ndarray:
    """One uint64 naming (document, line number), for membership tests against the fitted state."""
    return mix64(doc_keys ^ mix64(line_numbers.astype(np.uint64) + np.uint64(1)))


@register_step
class LineDedup(Step):
    """CCNet-style line deduplication: drop lines already seen in an earlier document.

    Lines are compared by their words (case, punctuation and spacing ignored, as CCNet normalises).
    A line repeated inside the document where it first appears is kept; only its copies in later
    documents go. The fitted state is the set of (document, line number) pairs to drop, so ``process``
    needs no hashing of lines, only a split.
    """

    name = "line_dedup"

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
