"""C4's line-level cleaning (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.2; reference code tensorflow_datasets c4_utils.clean_page,
as re-implemented by datatrove's C4QualityFilter).

Unlike a filter, C4 rewrites what it keeps: navigation, cookie banners and other lines that are not
prose are dropped from each page, and a page is dropped only if too little prose remains or it shows a
sign of not being prose at all. Every document's lines are flattened into one Arrow array, judged with
vectorised kernels, and the survivors joined back per document.

Defaults are those of the C4 reference code that built the published dataset: at least 5 words per line
and 3 sentences per page, end marks . ? ! ". datatrove's C4QualityFilter defaults to 3 words and 5
sentences and also accepts ' as an end mark; set the params to reproduce it. FineWeb's pipeline runs it
with filter_no_terminal_punct=False.

Words are split on Unicode whitespace, as Python's str.split in the reference (a no-break space
separates words). Sentences are counted per kept line, as the reference does with NLTK's punkt, but
with sentencex (Wikimedia's rule-based splitter, a Rust extension with its abbreviation lists built in):
punkt needs a model downloaded at run time, and end-mark counting takes "Dr.", "U.S." and "p.m." for
sentence ends. The splitter only runs where the count can change the verdict: a kept line with a word
holds a sentence at least, so a page with min_sentences such lines passes the rule without it. On 5 000
prose lines (1 MB), sentencex took 4 us a line, pysbd (pure Python) 800 us.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencex
from pydantic import Field

from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.curate.text_rules import first_failure, per_row, split_rows
from tokenmill.documents.schema import put_column, with_reason

POLICY_PHRASES = (
    "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"
)
CITATION = r"\[\d*\]|\[edit\]|\[citation needed\]"  # Wikipedia-style markers, removed from lines
LINE_REASONS = ("long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


class C4Params(StepParams):
    step: Literal["c4"] = "c4"
    filter_no_terminal_punct: bool = Field(
        True, description="Drop lines that do not end in one of end_marks, or that end in '...'."
    )
    end_marks: str = Field(
        '.?!"', min_length=1, description="Characters a kept line must end with (filter_no_terminal_punct)."
    )
    min_words_per_line: int = Field(5, ge=0, description="Drop lines with fewer whitespace-separated words.")
    min_sentences: int = Field(
        3, ge=0, description="Drop documents with fewer sentences (sentencex, per line) after line filtering."
    )
    max_word_length: int | None = Field(
        1000, ge=1, description="Drop lines holding a word longer than this (None: no limit)."
    )
    remove_citations: bool = Field(
        True, description="Strip [1], [edit] and [citation needed] markers from lines."
    )
    filter_javascript: bool = Field(
        True, description="Drop lines mentioning javascript (\"please enable JavaScript\")."
    )
    filter_policy: bool = Field(True, description="Drop lines with terms-of-use, privacy or cookie phrases.")
    filter_lorem_ipsum: bool = Field(
        True, description="Drop documents with a 'lorem ipsum' line (placeholder text)."
    )
    filter_curly_bracket: bool = Field(
        True, description="Drop documents with a '{' in a line (code, not prose)."
    )
    bad_words_path: Path | None = Field(
        None,
        description="Local file with one word or phrase per line (e.g. the LDNOOBW list C4 used); documents "
        "containing any of them as whole words, ignoring case, are dropped. None: no bad-words rule.",
    )


class C4(Step):
    """Keep only prose lines; drop pages with too little prose left or with signs of placeholder or code.

    Line rules, in the reference order (counted in counters as ``lines_removed_<reason>``): long_word,
    no_terminal_punct (does not end in an end mark, or ends in '...'; switchable), too_few_words,
    javascript, policy.
    Document reasons: lorem_ipsum and curly_bracket (judged on lines that passed the earlier line rules,
    as in the reference), too_few_sentences, bad_words (on the cleaned text). Removed documents keep
    their original text; kept ones carry the cleaned text.
    """

    Params = C4Params

    def __init__(self, params: StepParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._bad_words = _load_bad_words(self.params.bad_words_path)

    def process(self, table: pa.Table) -> StepResult:
        p = self.params
        text = table.column("text").combine_chunks()
        n = len(text)
        lines, rows = split_rows(text, "\n")
        lines = pc.utf8_trim_whitespace(lines)
        too_long = None if p.max_word_length is None else _has_longer_word(lines, p.max_word_length)
        if p.remove_citations:
            lines = pc.replace_substring_regex(lines, CITATION, "")
        unfinished = _unfinished(lines, p.end_marks) if p.filter_no_terminal_punct else None
        _, word_rows = split_rows(lines)
        words = per_row(word_rows, len(lines))
        lower = pc.utf8_lower(lines)

        def mentions(*phrases: str) -> np.ndarray:
            return _matches(lower, "|".join(map(re.escape, phrases)))

        line_reasons = first_failure(
            len(lines),
            [
                ("long_word", too_long),
                ("no_terminal_punct", unfinished),
                ("too_few_words", words < p.min_words_per_line),
                ("lorem_ipsum", mentions("lorem ipsum") if p.filter_lorem_ipsum else None),
                ("javascript", mentions("javascript") if p.filter_javascript else None),
                ("curly_bracket", mentions("{") if p.filter_curly_bracket else None),
                ("policy", mentions(*POLICY_PHRASES) if p.filter_policy else None),
            ],
        )
        kept_line = line_reasons == ""
        kept_lines, kept_rows = lines.filter(pa.array(kept_line)), rows[kept_line]
        sentences = _sentences(kept_lines, kept_rows, words[kept_line] > 0, n, p.min_sentences)
        cleaned = _join_lines(kept_lines, kept_rows, n)

        reasons = first_failure(
            n,
            [
                ("lorem_ipsum", per_row(rows[line_reasons == "lorem_ipsum"], n) > 0),
                ("curly_bracket", per_row(rows[line_reasons == "curly_bracket"], n) > 0),
                ("too_few_sentences", per_row(kept_rows, n, sentences) < p.min_sentences),
                ("bad_words", None if self._bad_words is None else _matches(cleaned, self._bad_words)),
            ],
        )
        keep = reasons == ""
        cleaned_table = put_column(table, "text", cleaned)
        removed = with_reason(table.filter(pa.array(~keep)), list(reasons[~keep]), self.name)
        counters = {f"lines_removed_{r}": int((line_reasons == r).sum()) for r in LINE_REASONS}
        return StepResult(cleaned_table.filter(pa.array(keep)), removed, counters)


def _unfinished(lines: pa.Array, end_marks: str) -> np.ndarray:
    """Per line: does it miss a final end mark, or trail off with '...'?"""
    marks = "".join(re.escape(mark) for mark in end_marks)
    unfinished = pc.invert(pc.match_substring_regex(lines, rf"[{marks}]$"))
    return pc.or_(unfinished, pc.ends_with(lines, "...")).to_numpy(zero_copy_only=False)


def _sentences(lines: pa.Array, rows: np.ndarray, worded: np.ndarray, n_rows: int, needed: int) -> np.ndarray:
    """Per line, its sentence count where the verdict needs it. A line with a word holds a sentence at
    least, so in a document with ``needed`` such lines that lower bound decides, and the splitter, the
    costly part, runs only on the lines of the other documents."""
    sentences = worded.astype(np.int64)
    undecided = np.flatnonzero(worded & (per_row(rows, n_rows, worded)[rows] < needed))
    if len(undecided):
        sentences[undecided] = _count_sentences(lines.take(pa.array(undecided)).to_pylist())
    return sentences


def _count_sentences(lines: list[str]) -> list[int]:
    """Sentences per line by sentencex's English rules (C4 keeps English pages only)."""
    return [sum(1 for _ in sentencex.segment("en", line)) for line in lines]


def _has_longer_word(lines: pa.Array, limit: int) -> np.ndarray:
    """Per line: does a whitespace-separated word exceed ``limit`` characters? Only lines longer than
    the limit can, and they are rare, so just those are split in Python (a counted RE2 repetition
    this long is orders of magnitude slower)."""
    result = np.zeros(len(lines), dtype=bool)
    candidates = np.flatnonzero(pc.utf8_length(lines).to_numpy() > limit)
    for index, line in zip(candidates, lines.take(pa.array(candidates, pa.int64())).to_pylist()):
        result[index] = max(map(len, line.split())) > limit
    return result


def _join_lines(lines: pa.Array, rows: np.ndarray, n_rows: int) -> pa.Array:
    """Join each row's lines with newlines (rows without lines become empty strings)."""
    offsets = np.concatenate(([0], np.cumsum(per_row(rows, n_rows)))).astype(np.int64)
    per_document = pa.LargeListArray.from_arrays(pa.array(offsets), lines)
    return pc.binary_join(per_document, pa.scalar("\n", lines.type))


def _matches(text: pa.Array, pattern: str) -> np.ndarray:
    return pc.match_substring_regex(text, pattern).to_numpy(zero_copy_only=False)


def _load_bad_words(path: Path | None) -> str | None:
    """A case-insensitive RE2 pattern matching any listed word or phrase between non-word characters."""
    if path is None:
        return None
    try:
        words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise TokenmillError(
            f"c4.bad_words_path: cannot read {path}: {error}; give a UTF-8 text file, one word a line"
        ) from error
    words = [w for w in words if w]
    if not words:
        raise TokenmillError(f"c4.bad_words_path: {path} lists no words; give one word or phrase per line")
    return r"(?i)(?:^|\W)(?:" + "|".join(map(re.escape, words)) + r")(?:\W|$)"
