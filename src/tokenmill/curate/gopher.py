"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", MassiveText, appendix A.1.1 and table A1).

Definitions follow datatrove's GopherQualityFilter and GopherRepetitionFilter, with one change that
makes them vectorisable: words are whitespace tokens, not NLTK tokens, and punctuation attached to a
word is trimmed where the word's length matters. Every statistic is an Arrow kernel over the batch plus
a numpy reduction per document; the n-gram statistics, the costly part, run only on documents that
passed the line and paragraph rules. Duplicate detection hashes (document, piece) pairs, so no Python
runs per document.
"""

from __future__ import annotations

import re
import string
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tokenmill.curate.base import FilterStep, StepParams
from tokenmill.curate.text_rules import (
    at_least,
    at_most,
    count,
    first_failure,
    group_ids,
    is_repeat,
    per_row,
    ratio,
    repeated_pieces,
    split_rows,
    staged_reasons,
)

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# What a word's length ignores and what alone does not make a word ("--", "...", "#").
PUNCTUATION = string.punctuation + "…‘’“”–—«»•·¡¿"


# ---- quality ---------------------------------------------------------------------------------------
class GopherQualityParams(StepParams):
    step: Literal["gopher_quality"] = "gopher_quality"
    min_words: int | None = Field(50, description="Fewest words (tokens with a non-punctuation character).")
    max_words: int | None = Field(100_000, description="Most words.")
    min_mean_word_length: float | None = Field(3, description="Lowest mean word length, in characters.")
    max_mean_word_length: float | None = Field(10, description="Highest mean word length, in characters.")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="Highest count of '#', and separately of ellipses ('...' or '…'), per token."
    )
    max_bullet_lines_ratio: float | None = Field(
        0.9, description="Highest fraction of lines starting with a bullet ('•' or '-')."
    )
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, description="Highest fraction of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float | None = Field(
        0.8, description="Lowest fraction of tokens containing at least one letter."
    )
    min_stop_words: int | None = Field(
        2, description="Fewest distinct stop words present (case-insensitive, whole words)."
    )
    stop_words: list[str] = Field(
        list(STOP_WORDS),
        min_length=1,
        description="The stop words counted by min_stop_words (Gopher's English list).",
    )


class GopherQuality(FilterStep):
    """Gopher's quality rules, thresholds of the paper (A.1.1) and datatrove as defaults.

    Reasons, in the paper's order: gopher_word_count (50..100 000 words), gopher_mean_word_length
    (3..10), gopher_hash_ratio and gopher_ellipsis_ratio (> 0.1 per token), gopher_bullet_lines
    (> 90 % of lines), gopher_ellipsis_lines (> 30 % of lines), gopher_alpha_words (< 80 % of tokens
    with a letter), gopher_stop_words (< 2 distinct stop words: the paper asks for two of the list, and
    datatrove has counted distinct words since January 2025; occurrences would pass "the the ...").
    """

    Params = GopherQualityParams

    def reasons(self, table: pa.Table) -> np.ndarray:
        p = self.params
        text = table.column("text").combine_chunks()
        n = len(text)
        tokens, rows = split_rows(text)
        word_length = pc.utf8_length(pc.utf8_trim(tokens, PUNCTUATION)).to_numpy()
        n_tokens = per_row(rows, n)
        n_words = per_row(rows, n, word_length > 0)
        mean_length = ratio(per_row(rows, n, word_length), n_words)
        has_letter = pc.match_substring_regex(tokens, r"\pL").to_numpy(zero_copy_only=False)
        letter_tokens = per_row(rows, n, has_letter)
        n_lines = count(text, "\n", regex=False) + 1
        hashes = count(text, "#", regex=False)
        ellipses = count(text, "...", regex=False) + count(text, "…", regex=False)
        bullet_lines = count(text, r"(?m)^[ \t]*[•\-]")
        ellipsis_lines = count(text, r"(?m)(?:\.\.\.|…)[ \t]*$")
        few_stop_words = None
        if p.min_stop_words is not None:
            few_stop_words = _words_present(text, p.stop_words, p.min_stop_words) < p.min_stop_words
        return first_failure(
            n,
            [
                ("gopher_word_count", at_least(n_words, p.min_words)),
                ("gopher_word_count", at_most(n_words, p.max_words)),
                ("gopher_mean_word_length", at_least(mean_length, p.min_mean_word_length)),
                ("gopher_mean_word_length", at_most(mean_length, p.max_mean_word_length)),
                ("gopher_hash_ratio", at_most(ratio(hashes, n_tokens), p.max_symbol_word_ratio)),
                ("gopher_ellipsis_ratio", at_most(ratio(ellipses, n_tokens), p.max_symbol_word_ratio)),
                ("gopher_bullet_lines", at_most(bullet_lines / n_lines, p.max_bullet_lines_ratio)),
                ("gopher_ellipsis_lines", at_most(ellipsis_lines / n_lines, p.max_ellipsis_lines_ratio)),
                ("gopher_alpha_words", at_least(ratio(letter_tokens, n_tokens), p.min_alpha_words_ratio)),
                ("gopher_stop_words", few_stop_words),
            ],
        )


def _words_present(text: pa.Array, words: list[str], enough: int) -> np.ndarray:
    """Per row: how many distinct ``words`` occur in it (case-insensitive, whole words), counted up to
    ``enough``. A row is no longer searched once it has that many, so prose is settled after the first
    two or three words and this costs less than one pass counting every occurrence."""
    found = np.zeros(len(text), dtype=np.int64)
    for word in dict.fromkeys(word.lower() for word in words):
        searched = np.flatnonzero(found < enough)
        if len(searched) == 0:
            break
        rows = text if len(searched) == len(text) else text.take(pa.array(searched))
        found[searched] += pc.match_substring_regex(rows, rf"(?i)\b{re.escape(word)}\b").to_numpy(
            zero_copy_only=False
        )
    return found


# ---- repetition ------------------------------------------------------------------------------------
class GopherRepetitionParams(StepParams):
    step: Literal["gopher_repetition"] = "gopher_repetition"
    dup_line_frac: float | None = Field(
        0.30, description="Highest fraction of lines that repeat an earlier line."
    )
    dup_para_frac: float | None = Field(
        0.30, description="Highest fraction of paragraphs (split on blank lines) that repeat an earlier one."
    )
    dup_line_char_frac: float | None = Field(
        0.20, description="Highest fraction of the document's characters inside repeated lines."
    )
    dup_para_char_frac: float | None = Field(
        0.20, description="Highest fraction of the document's characters inside repeated paragraphs."
    )
    top_n_grams: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> highest fraction of characters covered by the most frequent repeated word n-gram.",
    )
    dup_n_grams: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> highest fraction of characters in the words covered by n-grams that repeat "
        "an earlier n-gram.",
    )


class GopherRepetition(FilterStep):
    """Gopher's repetition rules, thresholds of table A1 as defaults.

    Reasons, in table A1's order: dup_line_frac (> 0.30), dup_para_frac (> 0.30), dup_line_char_frac
    (> 0.20), dup_para_char_frac (> 0.20), top_{n}_gram (2: 0.20, 3: 0.18, 4: 0.16), dup_{n}_gram
    (5: 0.15 ... 10: 0.10). Character fractions are over the whole document's characters. Two
    deliberate differences from datatrove: a top n-gram must occur at least twice (a unique n-gram is
    not repetition, which datatrove's count-1 case treats as such in very short documents), and
    repeated n-gram characters are those of the words such n-grams cover, each word counted once, as
    the paper words it, where datatrove skips ahead greedily.
    """

    Params = GopherRepetitionParams

    def reasons(self, table: pa.Table) -> np.ndarray:
        stages = [self._line_and_paragraph_reasons]
        if self.params.top_n_grams or self.params.dup_n_grams:
            stages.append(self._n_gram_reasons)
        return staged_reasons(table.column("text").combine_chunks(), stages)

    def _line_and_paragraph_reasons(self, text: pa.Array) -> np.ndarray:
        p, n = self.params, len(text)
        chars = pc.utf8_length(text).to_numpy()
        lines, line_rows = split_rows(text, r"\n+")
        paras, para_rows = split_rows(pc.utf8_trim_whitespace(text), r"\n{2,}")
        dup_lines, line_dup_chars = self._repeats(lines, line_rows, n)
        dup_paras, para_dup_chars = self._repeats(paras, para_rows, n)
        return first_failure(
            n,
            [
                ("dup_line_frac", at_most(ratio(dup_lines, per_row(line_rows, n)), p.dup_line_frac)),
                ("dup_para_frac", at_most(ratio(dup_paras, per_row(para_rows, n)), p.dup_para_frac)),
                ("dup_line_char_frac", at_most(ratio(line_dup_chars, chars), p.dup_line_char_frac)),
                ("dup_para_char_frac", at_most(ratio(para_dup_chars, chars), p.dup_para_char_frac)),
            ],
        )

    @staticmethod
    def _repeats(pieces: pa.Array, rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row: how many pieces repeat an earlier piece, and how many characters those hold."""
        repeat = repeated_pieces(pieces, rows)
        lengths = pc.utf8_length(pieces).to_numpy()
        return per_row(rows[repeat], n_rows), per_row(rows[repeat], n_rows, lengths[repeat])

    def _n_gram_reasons(self, text: pa.Array) -> np.ndarray:
        """The n-gram rules by increasing n (top before duplicate at equal n), each over the documents
        every earlier rule kept."""
        top, dup = self.params.top_n_grams, self.params.dup_n_grams
        chars = pc.utf8_length(text).to_numpy()
        reasons = np.full(len(text), "", dtype=object)
        ngrams = _RepeatedNGrams(text)
        for size in range(2, max([*top, *dup]) + 1):
            ngrams.grow(alive=reasons == "")
            if size in top:
                failed = ratio(ngrams.top_chars(), chars) > top[size]
                reasons[(reasons == "") & failed] = f"top_{size}_gram"
            if size in dup:
                failed = ratio(ngrams.duplicate_chars(), chars) > dup[size]
                reasons[(reasons == "") & failed] = f"dup_{size}_gram"
        return reasons


class _RepeatedNGrams:
    """Word n-grams of a batch, grown one word at a time, keeping only those that occur twice or more.

    An n-gram is a 64-bit polynomial hash of per-batch word ids, salted by its row so that equal n-grams
    in different documents never meet. An n-gram can only repeat if its (n-1)-word prefix repeats, so
    each size looks only at the starts whose prefix repeated: after the first sizes, a small fraction of
    the words of ordinary prose.
    """

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, text: pa.Array):
        words, self.rows = split_rows(text)
        self.n_rows = len(text)
        self.word_ids = group_ids(words).astype(np.uint64) + np.uint64(1)
        self.prefix_chars = np.concatenate(([0], np.cumsum(pc.utf8_length(words).to_numpy())))
        # For each word, the index one past the last word of its row: no n-gram crosses it.
        self.row_end = np.cumsum(per_row(self.rows, self.n_rows))[self.rows]
        self.size = 1
        self.starts = np.arange(len(self.rows))
        with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 by design
            self.hashes = self.rows.astype(np.uint64) * self._BASE + self.word_ids

    def grow(self, alive: np.ndarray) -> None:
        """Extend every kept n-gram of a live row by its next word; group the results."""
        self.size += 1
        fits = (self.starts + self.size <= self.row_end[self.starts]) & alive[self.rows[self.starts]]
        starts = self.starts[fits]
        with np.errstate(over="ignore"):
            hashes = self.hashes[fits] * self._BASE + self.word_ids[starts + self.size - 1]
        self.group = group_ids(hashes)
        self.occurrences = np.bincount(self.group)
        recurring = self.occurrences[self.group] >= 2
        self.group_starts = starts  # before dropping single n-grams: top_chars needs each group's first
        self.starts, self.hashes = starts[recurring], hashes[recurring]

    def top_chars(self) -> np.ndarray:
        """Per row: occurrences x characters (words and the spaces between them) of the most frequent
        n-gram occurring at least twice; ties go to the longer n-gram."""
        first = self.group_starts[~is_repeat(self.group)]  # dense ids: first[g] is where group g starts
        repeated = self.occurrences >= 2
        first, occurrences = first[repeated], self.occurrences[repeated]
        rows = self.rows[first]
        covered = occurrences * (self._chars(first, self.size) + self.size - 1)
        order = np.lexsort((covered, occurrences, rows))  # the best group of each row sorts last
        best = order[np.r_[rows[order][1:] != rows[order][:-1], True]] if len(order) else order
        top = np.zeros(self.n_rows)
        top[rows[best]] = covered[best]
        return top

    def duplicate_chars(self) -> np.ndarray:
        """Per row: characters of the words covered by n-grams repeating an earlier n-gram of the row,
        each word counted once however many such n-grams overlap it."""
        repeats = self.group_starts[is_repeat(self.group)]  # ascending
        # Equal-length intervals sorted by start: their union is each one cut at the next one's start.
        ends = np.minimum(repeats + self.size, np.r_[repeats[1:], np.iinfo(np.int64).max])
        return per_row(self.rows[repeats], self.n_rows, self.prefix_chars[ends] - self.prefix_chars[repeats])

    def _chars(self, starts: np.ndarray, size: int) -> np.ndarray:
        return self.prefix_chars[starts + size] - self.prefix_chars[starts]
