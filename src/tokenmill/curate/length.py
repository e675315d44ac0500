"""Length filter: drop documents too short to teach anything or too long to be a single document.

Both lengths are pyarrow kernels over the whole batch: characters are code points (``utf8_length``),
words are runs of non-whitespace (``\\S+``), counted without materialising the words.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from tokenmill.curate.base import FilterStep, StepParams


class LengthFilterParams(StepParams):
    step: Literal["length_filter"] = "length_filter"
    min_chars: int | None = Field(
        None, ge=0, description="Remove documents with fewer characters (None: no minimum)."
    )
    max_chars: int | None = Field(
        None, ge=0, description="Remove documents with more characters (None: no maximum)."
    )
    min_words: int | None = Field(
        None, ge=0, description="Remove documents with fewer whitespace-separated words (None: no minimum)."
    )
    max_words: int | None = Field(
        None, ge=0, description="Remove documents with more whitespace-separated words (None: no maximum)."
    )

    @model_validator(mode="after")
    def _ranges_not_empty(self) -> "LengthFilterParams":
        for unit in ("chars", "words"):
            low, high = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_{unit}={low} is above max_{unit}={high}; no document could pass")
        return self


class LengthFilter(FilterStep):
    """Remove documents outside character and word-count bounds.

    Reasons, checked in this order: too_short_chars, too_long_chars, too_few_words, too_many_words."""

    Params = LengthFilterParams

    def reasons(self, table: pa.Table) -> np.ndarray:
        p = self.params
        text = table.column("text")
        reasons = np.full(table.num_rows, "", dtype=object)

        def reject(failed: np.ndarray, reason: str) -> None:
            reasons[(reasons == "") & failed] = reason

        if p.min_chars is not None or p.max_chars is not None:
            chars = pc.utf8_length(text).to_numpy()
            if p.min_chars is not None:
                reject(chars < p.min_chars, "too_short_chars")
            if p.max_chars is not None:
                reject(chars > p.max_chars, "too_long_chars")
        if p.min_words is not None or p.max_words is not None:
            words = pc.count_substring_regex(text, r"\S+").to_numpy()
            if p.min_words is not None:
                reject(words < p.min_words, "too_few_words")
            if p.max_words is not None:
                reject(words > p.max_words, "too_many_words")
        return reasons
