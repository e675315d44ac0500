"""Text normalisation: one canonical spelling of whitespace and Unicode before any rule looks at text.

Rules, hashes and dedup compare strings, so ``"café"`` in two Unicode forms, ``\\r\\n`` against ``\\n``
or trailing blanks would make equal documents differ. Every edit is a pyarrow regex kernel over the
whole batch; leading indentation is kept because code and verse depend on it.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.schema import put_column, with_reason

# (pattern, replacement) applied in order; RE2 syntax, so ``\1`` is a back-reference.
_WHITESPACE_EDITS = (
    (r"\r\n?", "\n"),  # Windows and old-Mac line endings
    (r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", ""),  # C0/C1 control characters except \t and \n
    (r"(\S)[ \t]{2,}", r"\1 "),  # runs of blanks inside a line (indentation is left alone)
    (r"[ \t]+(\n|$)", r"\1"),  # trailing blanks on each line
    (r"\n{4,}", "\n\n\n"),  # at most two blank lines in a row
)


class NormalizeParams(StepParams):
    step: Literal["normalize"] = "normalize"
    form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description="Unicode normal form. NFC only composes characters; NFKC also folds compatibility "
        "forms (full-width letters, ligatures, non-breaking spaces); 'none' leaves code points as they are.",
    )


class Normalize(Step):
    """Canonicalise Unicode and whitespace; remove documents left empty (reason ``empty``)."""

    Params = NormalizeParams

    def process(self, table: pa.Table) -> StepResult:
        original = table.column("text")
        text = original
        if self.params.form != "none":
            text = pc.utf8_normalize(text, form=self.params.form)
        for pattern, replacement in _WHITESPACE_EDITS:
            text = pc.replace_substring_regex(text, pattern=pattern, replacement=replacement)
        text = pc.utf8_trim_whitespace(text)

        changed = pc.not_equal(original, text).to_numpy(zero_copy_only=False)
        empty = pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
        normalized = put_column(table, "text", text)
        kept = normalized.filter(pa.array(~empty))
        removed = with_reason(table.filter(pa.array(empty)), "empty", self.name)  # as it came in
        return StepResult(kept, removed, {"normalized": int((changed & ~empty).sum())})
