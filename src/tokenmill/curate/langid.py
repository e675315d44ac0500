"""Language identification with the naive-Bayes byte n-gram model that ships inside py3langid.

py3langid (a maintained fork of langid.py, 140 languages, no download) walks each text's bytes
through an automaton that emits n-gram features, then scores every language with one matrix
product. It does that one document at a time in Python; here the automaton advances all documents
of a batch in lockstep (one numpy gather per byte position), and the scoring is one matrix product
per chunk of documents over only the features that chunk emitted. Same decisions and scores (to
1e-5); on 3,150 kernel docs on a busy 2-core machine, 2.6× py3langid's speed (1,040 docs/s), 4.3×
(2,050 docs/s) with one BLAS thread per process, as a process pool should run.

``language_score`` is py3langid's normalised probability: the softmax of the naive-Bayes
log-likelihoods at temperature sqrt(text bytes), which keeps long texts from saturating at 1.0 the
way raw naive-Bayes posteriors do. On the Linux kernel documentation (2,808 English files, 341
translations) a score ≥ 0.65 — FineWeb's threshold for fastText — is right about English vs not
99.8% of the time; the 11% of files below it are mostly toctree stubs, tables and code listings,
while 99.5–100% of the English prose domains (bible, shakespeare, manpages, python docs) pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.schema import put_column

UNDETERMINED = "und"  # language of a text with no n-gram the model knows (empty, symbols only)
_WALK_DOCS = 1024  # documents walked in lockstep: bounds the (bytes × docs) feature matrix
_SCORE_DOCS = 256  # documents scored together: bounds the (docs × features used) count matrix


@dataclass(frozen=True)
class _Model:
    next_state: np.ndarray  # flattened transition rows: next_state[row_base[state] + byte]
    row_base: np.ndarray  # per state, offset of its 256-entry row
    feature: np.ndarray  # per state, the n-gram feature it emits, or -1
    log_prob: np.ndarray  # (features, classes) float16: log P(feature | class)
    prior: np.ndarray  # (classes,) log P(class)
    merge: np.ndarray  # (classes, labels) 0/1: folds py3langid's duplicate columns (sr, uz) into one label
    labels: tuple[str, ...]


@cache
def load_model() -> _Model:
    """The bundled model, loaded once per process (about 2 s)."""
    ident = LanguageIdentifier.from_model_file(MODEL_FILE)
    labels = tuple(dict.fromkeys(ident.nb_classes))
    merge = np.zeros((len(ident.nb_classes), len(labels)), dtype=np.float32)
    merge[np.arange(len(ident.nb_classes)), [labels.index(c) for c in ident.nb_classes]] = 1.0
    return _Model(
        next_state=np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode)),
        row_base=np.asarray(ident.tk_row, dtype=np.uint32) << 8,
        feature=np.asarray(ident.tk_output, dtype=np.int32),
        log_prob=np.asarray(ident.nb_ptc),
        prior=np.asarray(ident.nb_pc, dtype=np.float32),
        merge=merge,
        labels=labels,
    )


def identify(text: pa.Array | pa.ChunkedArray, max_chars: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Most likely language (object array of codes) and its probability for every text of a batch.

    Texts are prepared as py3langid does (NFC; all-uppercase texts lowercased) and cut to their first
    ``max_chars`` characters.
    """
    model = load_model()
    text = pc.utf8_slice_codeunits(text, 0, max_chars)
    text = pc.utf8_normalize(text, form="NFC")
    text = pc.if_else(pc.utf8_is_upper(text), pc.utf8_lower(text), text)
    data = pc.cast(text, pa.large_binary())
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    offsets = np.frombuffer(data.buffers()[1], dtype=np.int64, count=len(data) + 1, offset=data.offset * 8)
    raw = np.frombuffer(data.buffers()[2] or b"\0", dtype=np.uint8)
    lengths = np.diff(offsets)

    order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
    probs = np.zeros((len(data), len(model.labels)), dtype=np.float32)
    for start in range(0, len(order), _WALK_DOCS):
        rows = order[start:start + _WALK_DOCS]
        emitted = _walk(model, raw, offsets[rows], lengths[rows])
        for sub in range(0, len(rows), _SCORE_DOCS):
            part = slice(sub, sub + _SCORE_DOCS)
            probs[rows[part]] = _label_probs(model, emitted[:, part], lengths[rows[part]])
    best = probs.argmax(axis=1)
    score = probs[np.arange(len(best)), best]
    language = np.array(model.labels, dtype=object)[best]
    language[score == 0] = UNDETERMINED
    return language, score


def _walk(model: _Model, raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The feature each byte of each document emits, -1 for none: (max length, docs) int32.

    Documents come sorted by decreasing length, so those still reading at byte ``t`` are a prefix.
    """
    n, width = len(lengths), int(lengths.max(initial=0))
    positions = np.arange(width)
    padded = raw[np.minimum(starts[None, :] + positions[:, None], len(raw) - 1)]  # row t: byte t of each doc
    reading = n - np.searchsorted(np.sort(lengths), positions, side="right")
    emitted = np.full((width, n), -1, dtype=np.int32)
    state = np.zeros(n, dtype=np.uint32)
    for t, k in enumerate(reading):
        state[:k] = model.next_state[model.row_base[state[:k]] + padded[t, :k]]
        emitted[t, :k] = model.feature[state[:k]]
    return emitted


def _label_probs(model: _Model, emitted: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Label probabilities from the emitted features of a few documents (zeros when featureless)."""
    position, doc = np.nonzero(emitted >= 0)
    feature = emitted[position, doc]
    n_docs = emitted.shape[1]
    seen = np.zeros(len(model.log_prob), dtype=bool)
    seen[feature] = True
    used = np.flatnonzero(seen)  # only the features these documents emitted: a small dense matrix
    column = np.cumsum(seen, dtype=np.int64) - 1
    counts = np.bincount(doc * len(used) + column[feature], minlength=n_docs * len(used))
    counts = counts.reshape(n_docs, len(used))
    logits = np.log1p(counts, dtype=np.float32) @ model.log_prob[used].astype(np.float32) + model.prior
    logits /= np.sqrt(np.maximum(lengths, 1), dtype=np.float32)[:, None]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return (logits @ model.merge) * counts.any(axis=1, keepdims=True)


class LangidParams(StepParams):
    step: Literal["langid"] = "langid"
    languages: list[str] = Field(
        default_factory=list,
        description="Keep only documents in these languages (codes as py3langid reports them: ISO 639-1 "
        "where one exists, e.g. en, fr, zh). Empty: keep every language.",
    )
    min_score: float = Field(
        0.65, ge=0.0, le=1.0,
        description="Remove documents whose top language has a lower probability (softmax of the "
        "naive-Bayes scores at temperature sqrt(bytes)). 0.65 keeps 99.8%-accurate English/non-English "
        "decisions on the kernel docs and drops near-textless files (tables, code, stubs).",
    )
    max_chars: int = Field(
        2000, ge=1,
        description="Characters read from the start of each document. On the kernel docs, whole documents "
        "instead of 2000 characters changed one decision in 3,150 and took 7× longer.",
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, languages: list[str]) -> list[str]:
        unknown = sorted(set(languages) - set(load_model().labels))
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; the model knows: "
                             f"{', '.join(sorted(load_model().labels))}")
        return languages


class Langid(Step):
    """Add ``language`` and ``language_score`` columns; remove documents identified with less than
    ``min_score`` (reason ``language_low_score``: the language itself is uncertain) and then those
    confidently in a language outside ``languages`` (reason ``language_<code>``)."""

    Params = LangidParams

    def process(self, table: pa.Table) -> StepResult:
        language, score = identify(table.column("text"), self.params.max_chars)
        for name, values in (("language", pa.array(language, pa.string())),
                             ("language_score", pa.array(score, pa.float32()))):
            table = put_column(table, name, values)
        reasons = np.where(score < self.params.min_score, "language_low_score", "").astype(object)
        if self.params.languages:
            unwanted = ~np.isin(language, self.params.languages) & (reasons == "")
            reasons[unwanted] = "language_" + language[unwanted]
        return self.split(table, reasons)
