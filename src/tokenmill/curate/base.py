"""The step interface (datatrove-style): one class, typed params, one method over an Arrow batch.

A step sees one shard (a ``pyarrow.Table`` in the core schema) at a time and returns the documents it
keeps and the ones it removes, each removal with a ``reason``. Steps that must see the whole corpus
first (deduplication, decontamination index, classifier training) implement a two-phase ``fit``:
``fit_map`` runs on every shard in parallel and returns a small partial result, ``fit_reduce``
combines the partial results *in shard order* into the state ``process`` then uses. Executors only
call these methods, so the same step runs on the local process pool and on Ray.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from tokenmill.documents.schema import with_reason


class StepParams(BaseModel):
    """Base of every step's parameters. Subclasses set ``step: Literal["name"] = "name"``."""

    model_config = ConfigDict(extra="forbid")
    step: str


@dataclass
class StepResult:
    kept: pa.Table
    removed: pa.Table  # kept's columns + ``reason`` + ``step``
    counters: dict[str, int] = field(default_factory=dict)  # non-removal events, e.g. emails masked


class Step(ABC):
    """``name`` is read off ``Params.step``'s literal, so a step states its recipe name once."""

    name: ClassVar[str]
    Params: ClassVar[type[StepParams]]

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        params = cls.__dict__.get("Params")
        names = get_args(params.model_fields["step"].annotation) if params is not None else ()
        if len(names) == 1:
            cls.name = names[0]

    def __init__(self, params: StepParams | None = None, **kwargs: Any):
        if params is None:
            params = self.Params(step=self.name, **kwargs)
        elif kwargs:
            raise TypeError("pass either a params object or keyword arguments, not both")
        self.params = params

    # ---- optional whole-corpus phase -------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return type(self).fit_map is not Step.fit_map

    @property
    def fit_rounds(self) -> int:
        """Map/reduce passes before ``process``; each pass sees the state the previous one fitted
        (e.g. a selection step fits its scorer, then finds its global cut-off)."""
        return int(self.needs_fit)

    def fit_map(self, table: pa.Table) -> Any:  # pragma: no cover - overridden where needed
        raise NotImplementedError

    def fit_reduce(self, parts: list[Any]) -> None:  # pragma: no cover - overridden where needed
        raise NotImplementedError

    # ---- per-shard phase ---------------------------------------------------------------------
    @abstractmethod
    def process(self, table: pa.Table) -> StepResult: ...

    def split(self, table: pa.Table, reasons: np.ndarray | list) -> StepResult:
        """Keep rows whose reason is empty/None; reject the others with their reason."""
        reasons = np.asarray(reasons, dtype=object)
        reject = np.array([bool(r) for r in reasons], dtype=bool)
        if not reject.any():
            return StepResult(table, with_reason(table.slice(0, 0), [], self.name))
        keep_idx = np.flatnonzero(~reject)
        drop_idx = np.flatnonzero(reject)
        removed = with_reason(table.take(drop_idx), [str(r) for r in reasons[drop_idx]], self.name)
        return StepResult(table.take(keep_idx), removed)


class FilterStep(Step):
    """A step that only removes documents: implement ``reasons`` (vectorised over the batch)."""

    @abstractmethod
    def reasons(self, table: pa.Table) -> np.ndarray:
        """One entry per row: ``""`` (or None) to keep it, else the reason it is removed."""

    def process(self, table: pa.Table) -> StepResult:
        return self.split(table, self.reasons(table))
