"""FineWeb's extra quality rules (Penedo et al. 2024, "The FineWeb Datasets"; datatrove
FineWebQualityFilter), which catch the list-like and boilerplate pages Gopher and C4 let through.

Line statistics are regex counts over the batch; the duplicate-line and words statistics, which need the
text split, run only on documents the line rules kept. Words approximate NLTK's tokens (runs of letters
and digits, and runs of other non-space characters) so that datatrove's newline-per-word threshold keeps
its meaning.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tokenmill.curate.base import FilterStep, StepParams
from tokenmill.curate.text_rules import (
    at_most,
    count,
    first_failure,
    per_row,
    ratio,
    repeated_pieces,
    split_rows,
    staged_reasons,
)


class FineWebQualityParams(StepParams):
    step: Literal["fineweb"] = "fineweb"
    line_punct_thr: float | None = Field(
        0.12,
        description="Remove documents where the fraction of lines ending in . ' \" ! or ? is at most this.",
    )
    line_punct_exclude_zero: bool = Field(
        False, description="Exempt documents where no line at all ends in punctuation from line_punct_thr."
    )
    short_line_thr: float | None = Field(
        0.67, description="Remove documents where the fraction of short lines is at or above this."
    )
    short_line_length: int = Field(
        30, ge=0, le=999, description="A line of at most this many characters (999 at most) is short."
    )
    char_duplicates_ratio: float | None = Field(
        0.01,
        description="Remove documents where characters of non-empty lines repeating an earlier line make up "
        "at least this fraction of all characters other than newlines.",
    )
    new_line_ratio: float | None = Field(
        0.3, description="Remove documents with more than this many newlines per word (list-like pages)."
    )


class FineWebQuality(FilterStep):
    """FineWeb (v1, English) rules as datatrove's FineWebQualityFilter ran them from v0.2.0 to v0.3.x, the
    version of datatrove's examples/fineweb.py that built FineWeb; the thresholds are that filter's
    defaults. datatrove v0.4.0 (FineWeb-2) changed the rules (strict inequalities, blank lines dropped,
    multilingual end marks); they are not followed here.

    Reasons, in datatrove's order: line_punct_ratio (≤ 0.12 of lines end in punctuation),
    short_line_ratio (≥ 0.67 of lines have ≤ 30 characters), char_dup_ratio (≥ 0.01 of characters in
    duplicated lines), list_ratio (> 0.3 newlines per word)."""

    Params = FineWebQualityParams

    def reasons(self, table: pa.Table) -> np.ndarray:
        p = self.params
        stages = [self._line_reasons]
        if p.char_duplicates_ratio is not None:
            stages.append(self._duplicate_reasons)
        if p.new_line_ratio is not None:
            stages.append(self._list_reasons)
        return staged_reasons(table.column("text").combine_chunks(), stages)

    def _line_reasons(self, text: pa.Array) -> np.ndarray:
        p = self.params
        n_lines = count(text, "\n", regex=False) + 1
        few_punct = None
        if p.line_punct_thr is not None:
            punct = count(text, r"""(?m)[.'"!?]$""") / n_lines
            few_punct = (punct <= p.line_punct_thr) & ~(p.line_punct_exclude_zero & (punct == 0))
        many_short = None
        if p.short_line_thr is not None:
            long_lines = count(text, rf"(?m)^.{{{p.short_line_length + 1}}}")  # '.' stops at a newline
            many_short = (n_lines - long_lines) / n_lines >= p.short_line_thr
        return first_failure(len(text), [("line_punct_ratio", few_punct), ("short_line_ratio", many_short)])

    def _duplicate_reasons(self, text: pa.Array) -> np.ndarray:
        n = len(text)
        lines, rows = split_rows(text, "\n")
        nonempty = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0)
        lines, rows = lines.filter(nonempty), rows[nonempty.to_numpy(zero_copy_only=False)]
        repeat = repeated_pieces(lines, rows)
        duplicate_chars = per_row(rows[repeat], n, pc.utf8_length(lines).to_numpy()[repeat])
        chars = pc.utf8_length(text).to_numpy() - count(text, "\n", regex=False)
        too_many = ratio(duplicate_chars, chars) >= self.params.char_duplicates_ratio
        return first_failure(n, [("char_dup_ratio", too_many)])

    def _list_reasons(self, text: pa.Array) -> np.ndarray:
        words = count(text, r"[\pL\pN_]+|[^\pL\pN_\s]+")
        newlines_per_word = ratio(count(text, "\n", regex=False), words)
        too_many = at_most(newlines_per_word, self.params.new_line_ratio)
        return first_failure(len(text), [("list_ratio", too_many)])
