"""Quality classifier (DCLM / FineWeb-Edu style): a fastText model that tells target text from the rest.

The score is P(positive) under a supervised fastText classifier, trained here from a positive and a
negative ``TargetSet`` (negatives default to random pool documents outside the positives, as DCLM
trained against random RefinedWeb pages) or loaded from a saved model (e.g. DCLM's released
``openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin``, whose positive label is ``__label__hq``).

Hyper-parameter defaults follow DCLM: ``train_supervised`` with ``wordNgrams=2`` (unigram + bigram
features) and fastText's defaults otherwise, dim 100, ws 5, epoch 5, minCount 1 (mlfoundations/dclm
baselines/README.md and train_fasttext_classifier.py). Three deviations, all settable:
- lr 1.0 instead of 0.1: DCLM trains on 200k examples; on the few hundred to few thousand a tokenmill
  pool yields, lr 0.1 for 5 epochs leaves every probability near 0.5. On the 10k-document real corpus
  (python_docs as positives, a 2M-token budget) lr 0.1 picked 40% python_docs, lr 1.0 picked 82%.
- 200k hash buckets instead of 2M: an 80 MB model instead of 800 MB, which every worker loads.
- one training thread: fastText's multi-threaded SGD is not reproducible, and a rerun must select the
  same documents.

Texts are lowercased and every whitespace run made one space (fastText reads one line per example).
``predict`` is only ever called on a list: fastText 0.9.3's single-string path calls
``np.array(copy=False)``, which numpy 2 rejects.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Literal, NamedTuple

import fasttext
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill import TokenmillError
from tokenmill.select.base import ScoreParams, ScoreStep, TargetSet, TextSample, merge_samples, sample_rows

POSITIVE_LABEL = "__label__positive"
NEGATIVE_LABEL = "__label__negative"
MIN_TRAIN_DOCS = 10  # per class; below this a classifier learns nothing worth selecting by


class FastTextHyper(BaseModel):
    """fastText ``train_supervised`` settings (defaults: DCLM's, see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1.0, gt=0, description="Learning rate (DCLM: 0.1; lower it if training reports NaN).")
    dim: int = Field(100, ge=1, description="Size of the word vectors.")
    epoch: int = Field(5, ge=1, description="Passes over the training examples.")
    word_ngrams: int = Field(2, ge=1, description="Longest word n-gram used as a feature (2: unigrams and "
                             "bigrams, as DCLM).")
    min_count: int = Field(1, ge=1, description="Words seen fewer times are dropped from the vocabulary.")
    bucket: int = Field(200_000, ge=1, description="Hash buckets for n-gram features (fastText's default "
                        "is 2,000,000: 10x the model size).")
    threads: int = Field(1, ge=1, description="Training threads; more than 1 is faster but not reproducible.")


def normalize_texts(texts: pa.Array | pa.ChunkedArray | list[str]) -> list[str]:
    """Lowercase, every whitespace run one space: the one-line form fastText trains and predicts on."""
    texts = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.large_string())
    return pc.replace_substring_regex(pc.utf8_lower(texts), r"\s+", " ").to_pylist()


def train_fasttext(pos_texts: list[str] | pa.Array, neg_texts: list[str] | pa.Array, *, seed: int = 0,
                   **hyper: Any) -> fasttext.FastText._FastText:
    """A binary fastText classifier (labels ``POSITIVE_LABEL``/``NEGATIVE_LABEL``) on shuffled examples,
    the smaller class repeated to the size of the larger (as DCLM trained on balanced classes).

    ``hyper`` are ``FastTextHyper`` fields. Raises TokenmillError when a class has fewer than
    ``MIN_TRAIN_DOCS`` documents or training diverges.
    """
    settings = FastTextHyper(**hyper)
    for name, texts in (("positive", pos_texts), ("negative", neg_texts)):
        if len(texts) < MIN_TRAIN_DOCS:
            raise TokenmillError(f"the {name} training set has {len(texts)} documents; the classifier needs at "
                                 f"least {MIN_TRAIN_DOCS} per class (give more {name} documents or domains)")
    pos, neg = normalize_texts(pos_texts), normalize_texts(neg_texts)
    size = max(len(pos), len(neg))  # balance: the smaller class is repeated, so P = 0.5 means "undecided"
    lines = ([f"{POSITIVE_LABEL} {pos[i]}" for i in np.resize(np.arange(len(pos)), size)]
             + [f"{NEGATIVE_LABEL} {neg[i]}" for i in np.resize(np.arange(len(neg)), size)])
    order = np.random.default_rng(seed).permutation(len(lines))  # SGD must not see one class, then the other
    with tempfile.TemporaryDirectory(prefix="tokenmill-fasttext-") as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(lines[i] for i in order) + "\n", encoding="utf-8")
        # fastText's SGD can blow up to NaN on small or repetitive sets at its usual lr; its own advice
        # is a lower lr, so try lr/4 and lr/16 (with a warning) before giving up.
        for lr in (settings.lr, settings.lr / 4, settings.lr / 16):
            try:
                model = fasttext.train_supervised(
                    str(train_file), lr=lr, dim=settings.dim, epoch=settings.epoch,
                    wordNgrams=settings.word_ngrams, minCount=settings.min_count, bucket=settings.bucket,
                    thread=settings.threads, seed=seed, verbose=0)
            except RuntimeError as err:
                if "NaN" not in str(err):
                    raise
                continue
            if lr != settings.lr:
                print(f"[tokenmill] warning: fastText training diverged (NaN) at lr={settings.lr}; trained at "
                      f"lr={lr:g} instead (set fasttext.lr to choose)")
            return model
        raise TokenmillError(f"fastText training diverged (NaN) at lr={settings.lr}, {settings.lr / 4:g} and "
                             f"{settings.lr / 16:g}; lower fasttext.lr further or give more training documents")


def fasttext_scores(model: fasttext.FastText._FastText, texts: list[str] | pa.Array,
                    positive_label: str = POSITIVE_LABEL) -> np.ndarray:
    """P(``positive_label``) for each text (float64)."""
    if positive_label not in model.labels:
        raise TokenmillError(f"the fastText model has no label {positive_label!r} (labels: {model.labels}); "
                             f"set positive_label")
    labels, probs = model.predict(normalize_texts(texts), k=-1)
    return np.array([p[row.index(positive_label)] for row, p in zip(labels, probs)], dtype=np.float64)


def save_fasttext(model: fasttext.FastText._FastText, save_path: str | None, *, owner: object) -> str:
    """Save a trained classifier to ``save_path``, or to a temporary folder removed when ``owner``
    (the step) is garbage-collected; return the file's path for ``load_fasttext``."""
    if save_path:
        path = Path(save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        folder = tempfile.mkdtemp(prefix=f"tokenmill-{type(owner).__name__.lower()}-")
        weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
        path = Path(folder) / "model.bin"
    model.save_model(str(path))
    return str(path)


_LOADED: dict[tuple[str, int], fasttext.FastText._FastText] = {}  # one load per model file per worker


def load_fasttext(path: str) -> fasttext.FastText._FastText:
    """Load a saved model once per process (keyed by path and modification time, so a retrained file reloads)."""
    file = Path(path)
    if not file.is_file():
        raise TokenmillError(f"fastText model {path} does not exist; fix `model` or train one (give `positive`)")
    key = (str(file.resolve()), file.stat().st_mtime_ns)
    if key not in _LOADED:
        try:
            _LOADED[key] = fasttext.load_model(str(file))
        except ValueError as err:
            raise TokenmillError(f"{path} is not a fastText model: {err}") from None
    return _LOADED[key]


class QualityClassifierParams(ScoreParams):
    step: Literal["quality_classifier"] = "quality_classifier"
    model_path: str | None = Field(None, description="A saved fastText model (.bin) to score with; no training. "
                              "Exclusive with `positive`.")
    positive: TargetSet | None = Field(None, description="Documents of the kind to keep (e.g. a reference "
                                       "corpus, or pool domains); the classifier is trained on them.")
    negative: TargetSet | None = Field(None, description="Documents of the kind to drop. Default: a random "
                                       "sample of pool documents outside `positive`, as many as the positives.")
    positive_label: str = Field(POSITIVE_LABEL, description="Label whose probability is the score (for a "
                                "loaded model, e.g. '__label__hq' for DCLM's classifier).")
    save_path: str | None = Field(None, description="Where to save the trained model (.bin). Default: a "
                                   "temporary file, removed when the run ends; on a multi-node Ray cluster "
                                   "give a path every node sees.")
    fasttext: FastTextHyper = Field(default_factory=FastTextHyper)

    @model_validator(mode="after")
    def _one_model_source(self) -> "QualityClassifierParams":
        if (self.model_path is None) == (self.positive is None):
            raise ValueError("give either `model_path` (a saved classifier) or `positive` (documents to train on)")
        if self.negative is not None and self.positive is None:
            raise ValueError("`negative` is only used when training (with `positive`)")
        return self


class _TrainPart(NamedTuple):
    positive: TextSample | None
    negative: TextSample | None


class QualityClassifier(ScoreStep):
    """Score = P(positive) under a fastText classifier; keep the documents most like the positives."""

    Params = QualityClassifierParams

    def __init__(self, params: QualityClassifierParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.model_path = self.params.model_path

    @property
    def needs_model_fit(self) -> bool:
        return self.params.model_path is None

    def fit_model_map(self, table: pa.Table) -> _TrainPart:
        pos, neg, seed = self.params.positive, self.params.negative, self.params.seed
        pos_mask = pos.pool_mask(table)
        positives = sample_rows(table, pos_mask, pos.max_docs, seed) if pos.uses_pool else None
        if neg is None:
            negatives = sample_rows(table, ~pos_mask, pos.max_docs, seed)
        else:
            negatives = sample_rows(table, neg.pool_mask(table), neg.max_docs, seed) if neg.uses_pool else None
        return _TrainPart(positives, negatives)

    def fit_model_reduce(self, parts: list[_TrainPart]) -> None:
        pos, neg, seed = self.params.positive, self.params.negative, self.params.seed
        positives = pos.read_sources(seed) + merge_samples([p.positive for p in parts if p.positive], pos.max_docs)
        if neg is None:
            negatives = merge_samples([p.negative for p in parts], len(positives))
        else:
            negatives = neg.read_sources(seed) + merge_samples([p.negative for p in parts if p.negative],
                                                               neg.max_docs)
        model = train_fasttext(positives, negatives, seed=seed, **self.params.fasttext.model_dump())
        self.model_path = save_fasttext(model, self.params.save_path, owner=self)

    def score(self, table: pa.Table) -> np.ndarray:
        return fasttext_scores(load_fasttext(self.model_path), table["text"], self.params.positive_label)
