"""Score every document, then keep the best by a rule: the base of every selection step.

API (kept small and stable; every module of ``tokenmill.select`` builds on it):

``ScoreStep(Step)``: subclass it, set ``name`` and ``Params`` (a subclass of ``ScoreParams``) and
implement ``score(table) -> np.ndarray`` (one float per row, higher = better, the same for the same
rows on every call). A scorer that learns from the pool first sets ``needs_model_fit`` and implements
``fit_model_map(table)`` (per shard, in a worker) and ``fit_model_reduce(parts)`` (in shard order, in
the parent). A scorer whose ranking differs from its score (DSIR's Gumbel noise) overrides
``selection_keys``. ScoreStep does the rest: the ``score_column`` written into kept *and* removed
documents, the ``keep`` rule with its reason, the global cut-off, tie-breaks and counters.

``fit_rounds`` says how many fit passes (``fit_map`` over every shard, then ``fit_reduce``) the step
needs: one to fit the model if it learns from the pool, one to find the global cut-off if the rule is
global (top fraction, token budget, document count). The executor must run them all, in order.

``KeepRule``: ``threshold`` | ``top_fraction`` | ``token_budget`` | ``doc_count``.
``TargetSet``: where target/positive documents come from: files, pool domains, another step's score.
``sample_rows`` / ``merge_samples``: a deterministic uniform sample of pool texts gathered shard by shard.
``id_keys``, ``estimate_tokens``: the stable per-document hash and the token estimate the rules use.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.hashing import hash_strings, mix64
from tokenmill.documents.schema import put_column
from tokenmill.documents.readers import ReadStats, SourceConfig, read_source

log = logging.getLogger(__name__)

REASONS = {"threshold": "below_threshold", "top_fraction": "outside_top_fraction",
           "token_budget": "over_budget", "doc_count": "over_budget"}


class KeepRule(BaseModel):
    """Exactly one way to decide which scored documents stay."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, description="Keep documents scoring at least this (per shard, no "
                                                      "fit pass). NaN scores never pass.")
    top_fraction: float | None = Field(None, gt=0, le=1, description="Keep this fraction of the whole "
                                       "corpus, highest scores first (at least one document).")
    token_budget: int | None = Field(None, ge=1, description="Keep the highest-scoring documents until their "
                                     "estimated tokens (UTF-8 bytes / bytes_per_token) reach this; the "
                                     "document that crosses it is kept. A budget above the whole pool keeps "
                                     "everything and counts `budget_exceeds_pool`.")
    doc_count: int | None = Field(None, ge=1, description="Keep this many documents, highest scores first "
                                  "(more than the pool: keep all, count `budget_exceeds_pool`).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "KeepRule":
        chosen = [k for k, v in self.model_dump().items() if v is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of threshold, top_fraction, token_budget, doc_count "
                             f"(got {chosen or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def is_global(self) -> bool:
        """Whether the rule needs every document's score before any shard is decided."""
        return self.kind != "threshold"


class ScoreParams(StepParams):
    """Parameters every scoring step shares; subclasses add their own."""

    keep: KeepRule | None = Field(None, description="Which documents stay, e.g. {top_fraction: 0.1}, "
                                  "{token_budget: 5000000}, {threshold: 0.5}. None: score only, keep all "
                                  "(for a later step or the mixture to use the score).")
    score_column: str | None = Field(None, description="Column the score is written to, in kept and removed "
                                     "documents (default: '<step>_score').")
    bytes_per_token: float = Field(4.0, gt=0, description="UTF-8 bytes per token when estimating a document's "
                                   "tokens for token_budget (about 4 for English with a BPE tokenizer).")
    seed: int = Field(0, description="Seed of the id hash that breaks ties between equal scores (and of any "
                      "randomness the scorer uses), so selections are reproducible.")


def id_keys(ids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A stable pseudo-random uint64 per document id: tie-breaks, sampling and noise all derive from it."""
    return mix64(hash_strings(ids) ^ mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64)))


def estimate_tokens(table: pa.Table, bytes_per_token: float) -> np.ndarray:
    return pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False) / bytes_per_token


class _ScorePart(NamedTuple):
    keys: np.ndarray  # float64 ranking keys, NaN made -inf
    ties: np.ndarray  # uint64 id keys
    tokens: np.ndarray
    scores: np.ndarray | None  # only when the step reuses its fit scores


class _Cutoff(NamedTuple):
    """Keep a document iff (key, -tie) >= (key, -tie) of the last kept one, in (key desc, tie asc) order."""

    key: float
    tie: int
    keep_all: bool
    exceeds_pool: bool  # the budget or count asked for more than the pool holds
    boundary_split: bool  # documents sharing the cut-off key fell on both sides: the id hash decided
    all_equal: bool  # every key was equal: the whole selection is random by id hash


class ScoreStep(Step):
    """A step that writes a score per document and keeps documents by ``params.keep``."""

    Params: ClassVar[type[ScoreParams]]
    reuse_fit_scores: ClassVar[bool] = False  # True for costly scorers: keep fit-pass scores, skip rescoring

    def __init__(self, params: ScoreParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._model_fitted = False
        self._cutoff: _Cutoff | None = None
        self._fit_scores: tuple[np.ndarray, np.ndarray] | None = None  # sorted id keys, their scores

    # ---- what subclasses implement ---------------------------------------------------------------------
    def score(self, table: pa.Table) -> np.ndarray:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def needs_model_fit(self) -> bool:
        """Whether the scorer learns from the pool (then ``fit_model_map``/``fit_model_reduce`` run first)."""
        return False

    def fit_model_map(self, table: pa.Table) -> Any:  # pragma: no cover - overridden with needs_model_fit
        raise NotImplementedError

    def fit_model_reduce(self, parts: list[Any]) -> None:  # pragma: no cover - overridden with needs_model_fit
        raise NotImplementedError

    def selection_keys(self, table: pa.Table, scores: np.ndarray) -> np.ndarray:
        """What global rules rank by; the score itself unless the scorer samples (see DSIR)."""
        return scores

    # ---- the fit protocol ------------------------------------------------------------------------------
    @property
    def score_column(self) -> str:
        return self.params.score_column or f"{self.name}_score"

    @property
    def fit_rounds(self) -> int:
        keep = self.params.keep
        return int(self.needs_model_fit) + int(keep is not None and keep.is_global)

    @property
    def needs_fit(self) -> bool:
        return self.fit_rounds > 0

    def _fitting_model(self) -> bool:
        return self.needs_model_fit and not self._model_fitted

    def fit_map(self, table: pa.Table) -> Any:
        if self._fitting_model():
            return self.fit_model_map(table)
        scores = self._score(table)
        return _ScorePart(self._ranking(table, scores), id_keys(table["id"], self.params.seed),
                          estimate_tokens(table, self.params.bytes_per_token),
                          scores if self.reuse_fit_scores else None)

    def fit_reduce(self, parts: list[Any]) -> None:
        if self._fitting_model():
            self.fit_model_reduce(parts)
            self._model_fitted = True
            return
        keys = np.concatenate([p.keys for p in parts] or [np.empty(0)])
        ties = np.concatenate([p.ties for p in parts] or [np.empty(0, np.uint64)])
        tokens = np.concatenate([p.tokens for p in parts] or [np.empty(0)])
        if self.reuse_fit_scores:
            scores = np.concatenate([p.scores for p in parts] or [np.empty(0)])
            order = np.argsort(ties)
            self._fit_scores = (ties[order], scores[order])
        self._cutoff = self._find_cutoff(keys, ties, tokens)

    def _find_cutoff(self, keys: np.ndarray, ties: np.ndarray, tokens: np.ndarray) -> _Cutoff:
        rule, n = self.params.keep, len(keys)
        order = np.lexsort((ties, -keys))  # best first; equal keys by id key
        if rule.kind == "top_fraction":
            n_keep = max(1, round(rule.top_fraction * n))
        elif rule.kind == "doc_count":
            n_keep = min(rule.doc_count, n)
        else:
            n_keep = int(np.searchsorted(np.cumsum(tokens[order]), rule.token_budget)) + 1
        exceeds = (rule.kind == "doc_count" and rule.doc_count > n) or (rule.kind == "token_budget"
                                                                        and n_keep > n)
        if exceeds:
            log.warning("%s: the %s (%s) exceeds the pool (%d documents, ~%d tokens); keeping everything",
                        self.name, rule.kind, getattr(rule, rule.kind), n, int(tokens.sum()))
        if n_keep >= n:
            return _Cutoff(np.inf, 0, True, exceeds, False, False)
        last = order[n_keep - 1]
        at_key = keys == keys[last]
        all_equal = bool(at_key.all())
        if all_equal:
            log.warning("%s: all %d documents have the same score; the %s rule picks among them at random "
                        "(by id hash, seed %d)", self.name, n, rule.kind, self.params.seed)
        split = bool(at_key[order[n_keep:]].any())
        return _Cutoff(float(keys[last]), int(ties[last]), False, False, split, all_equal)

    # ---- the per-shard phase ---------------------------------------------------------------------------
    def _score(self, table: pa.Table) -> np.ndarray:
        if self._fitting_model():
            raise RuntimeError(f"{self.name}: scoring before its model was fitted; the executor must run "
                               f"fit_map/fit_reduce fit_rounds ({self.fit_rounds}) times")
        if table.num_rows == 0:
            return np.empty(0)
        scores = np.asarray(self.score(table), dtype=np.float64)
        if scores.shape != (table.num_rows,):
            raise RuntimeError(f"{self.name}.score returned shape {scores.shape} for {table.num_rows} rows")
        return scores

    def _ranking(self, table: pa.Table, scores: np.ndarray) -> np.ndarray:
        keys = np.asarray(self.selection_keys(table, scores), dtype=np.float64)
        return np.where(np.isnan(keys), -np.inf, keys)

    def _stored_scores(self, ties: np.ndarray) -> np.ndarray:
        known, scores = self._fit_scores
        at = np.minimum(np.searchsorted(known, ties), max(len(known) - 1, 0))
        if len(ties) and (len(known) == 0 or (known[at] != ties).any()):
            raise RuntimeError(f"{self.name}: a document was not seen in the fit pass (ids changed since?)")
        return scores[at]

    def process(self, table: pa.Table) -> StepResult:
        rule = self.params.keep
        if rule is not None and rule.is_global and self._cutoff is None:
            raise RuntimeError(f"{self.name}: process() before its {self.fit_rounds} fit round(s) ran; "
                               f"the executor must run fit_map/fit_reduce fit_rounds times")
        ties = id_keys(table["id"], self.params.seed)
        scores = self._stored_scores(ties) if self._fit_scores is not None else self._score(table)
        column = pa.array(scores, pa.float64())
        table = put_column(table, self.score_column, column)
        if rule is None:
            return self.split(table, np.full(table.num_rows, ""))
        counters: dict[str, int] = {}
        if rule.kind == "threshold":
            keep = scores >= rule.threshold
        else:
            cut, keys = self._cutoff, self._ranking(table, scores)
            keep = (keys > cut.key) | ((keys == cut.key) & (ties <= np.uint64(cut.tie))) | cut.keep_all
            if cut.exceeds_pool:
                counters["budget_exceeds_pool"] = table.num_rows
            if cut.boundary_split:
                counters["tied_at_cutoff"] = int((keys == cut.key).sum())
            if cut.all_equal:
                counters["all_scores_equal"] = table.num_rows
        result = self.split(table, np.where(keep, "", REASONS[rule.kind]))
        result.counters.update(counters)
        return result


class TargetSet(BaseModel):
    """Documents that show what to select for (or, as negatives, against); any mix of the three kinds."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(default_factory=list, description="Files outside the pool (jsonl, "
                                        "parquet, txt, ... as in `sources:` of a recipe).")
    domains: list[str] = Field(default_factory=list, description="Pool documents of these domains.")
    score_column: str | None = Field(None, description="Pool documents whose value in this column (written "
                                     "by an earlier step) is at least `min_score`.")
    min_score: float | None = Field(None, description="Threshold on `score_column`.")
    max_docs: int = Field(20000, ge=1, description="At most this many documents are used (a uniform sample "
                          "by id hash, the same on every run).")

    @model_validator(mode="after")
    def _something_given(self) -> "TargetSet":
        if not (self.sources or self.domains or self.score_column):
            raise ValueError("give at least one of sources, domains, score_column")
        if (self.score_column is None) != (self.min_score is None):
            raise ValueError("score_column and min_score go together")
        return self

    @property
    def uses_pool(self) -> bool:
        return bool(self.domains or self.score_column)

    def pool_mask(self, table: pa.Table) -> np.ndarray:
        """Which rows of a pool shard belong to the set."""
        mask = np.zeros(table.num_rows, bool)
        if self.domains:
            mask |= pc.is_in(table["domain"], value_set=pa.array(self.domains)).to_numpy(zero_copy_only=False)
        if self.score_column:
            if self.score_column not in table.column_names:
                raise TokenmillError(f"target score_column {self.score_column!r} is not a column of the pool "
                                     f"(columns: {table.column_names}); put the step that writes it earlier")
            values = pc.fill_null(table[self.score_column], np.nan).to_numpy(zero_copy_only=False)
            mask |= values >= self.min_score
        return mask

    def read_sources(self, seed: int = 0) -> list[str]:
        """Texts of the external sources, sampled down to ``max_docs`` by id hash (readable records only)."""
        ids, texts = [], []
        for src in self.sources:
            for rec in read_source(src, ReadStats()):
                if not rec.reason:
                    ids.append(f"{src.path}\0{rec.id}")
                    texts.append(rec.text)
        part = sample_rows(pa.table({"id": ids, "text": pa.array(texts, pa.large_string())}),
                           np.ones(len(ids), bool), self.max_docs, seed)
        return merge_samples([part], self.max_docs)


class TextSample(NamedTuple):
    keys: np.ndarray  # uint64 id keys of the sampled rows
    texts: pa.Array


def sample_rows(table: pa.Table, mask: np.ndarray, k: int, seed: int) -> TextSample:
    """The (at most) ``k`` masked rows with the smallest id keys: one shard's share of a uniform sample."""
    rows = np.flatnonzero(mask)
    keys = id_keys(table["id"], seed)[rows]
    best = np.argsort(keys, kind="stable")[:k]
    return TextSample(keys[best], table["text"].take(pa.array(rows[best])).combine_chunks())


def merge_samples(parts: list[TextSample], k: int) -> list[str]:
    """Merge per-shard samples into the global ``k`` smallest keys: a uniform sample of the whole pool."""
    if not parts:
        return []
    keys = np.concatenate([p.keys for p in parts])
    texts = pa.concat_arrays([p.texts.cast(pa.large_string()) for p in parts])
    return texts.take(pa.array(np.argsort(keys, kind="stable")[:k])).to_pylist()
