"""The run folder: where every stage's output lives, the typed records stages leave there, and the
lock that keeps one writer at a time.

Every module that reads or writes a run folder goes through this one, so the layout is stated once::

    RUN/
      tokenmill.json               format version of this layout
      recipe.yaml                  the resolved recipe, exactly as run
      stages.json                  each stage's fingerprint and the recipe inputs it was made from
      timings.json                 wall seconds per stage
      heldout/documents.parquet    evaluation documents, never curated or trained on
      curate/read/  curate/NN-STEP/    one StepFolder each:
          documents/shard-*.parquet    the kept documents, and nothing else (a Hugging Face
                                       ``load_dataset("parquet", data_dir=...)`` reads exactly them)
          rejected/shard-*.parquet     removed documents with ``reason`` and ``step``
          shards/shard-*.json          per-shard counts (their presence marks a shard done)
          stats.json                   the step's totals, a StepStats (its presence marks the step done)
      curate/final.json            which folder holds the curated documents
      select_cost.json             compute spent choosing the data (SelectCost)
      tokens/tokenizer/  tokens/train/  tokens/heldout/
      train/checkpoints/step-N/  train/metrics.jsonl  train/summary.json
      model/                       Hugging Face export
      eval/bpb.json                a decoder's bits per byte (BpbResult)
      eval/objective.json          an encoder's or encoder-decoder's figures (ObjectiveResult)
      eval/harness.json  eval/membership.json
      report.html
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill import TokenmillError
from tokenmill.files import read_json, read_jsonl, write_json_atomic

FORMAT = 2  # 2: kept documents under documents/, per-shard counts under shards/, a lock, this version file


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls, path: Path):
        """The record in ``path``, or None when there is no such file."""
        data = read_json(path)
        if data is None:
            return None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors())
            raise TokenmillError(f"{path}: not a valid {cls.__name__} ({problems})") from None

    def write(self, path: Path) -> None:
        write_json_atomic(self.model_dump(mode="json", exclude_none=True), path)


class StepStats(_Record):
    """What one curation step (or the read stage) did: documents and bytes in, kept and removed, removals
    by reason, and counters of events that remove nothing (emails masked, proxy FLOPs spent)."""

    step: str
    input_docs: int = 0
    input_bytes: int = 0
    kept_docs: int = 0
    kept_bytes: int = 0
    removed_docs: int = 0
    removed: dict[str, int] = Field(default_factory=dict)
    counters: dict[str, int | float] = Field(default_factory=dict)
    seconds: float = 0.0  # summed over shards (CPU-ish time); wall_seconds is the step's elapsed time
    shards: int | None = None
    wall_seconds: float | None = None
    files: int | None = None  # the read stage: source files read

    @classmethod
    def merge(cls, step: str, parts: Sequence["StepStats"]) -> "StepStats":
        """The totals of a step's per-shard stats."""
        total = cls(step=step, shards=len(parts))
        for part in parts:
            for key in ("input_docs", "input_bytes", "kept_docs", "kept_bytes", "removed_docs", "seconds"):
                setattr(total, key, getattr(total, key) + getattr(part, key))
            for group in ("removed", "counters"):
                mine = getattr(total, group)
                for k, v in getattr(part, group).items():
                    mine[k] = mine.get(k, 0) + v
        return total


class SelectCost(_Record):
    """``RUN/select_cost.json``, written by data selection so that equal-compute comparisons charge it,
    e.g. ``{"flops": 1.2e15, "seconds": 340.5}``."""

    flops: float = Field(ge=0, description="Floating-point operations spent choosing the training data: every "
                                           "forward pass of a reference, proxy or classifier model over candidate "
                                           "documents (2·N_ref per token scored), embeddings and clustering "
                                           "included; training the selector counts 6·N_ref per token.")
    seconds: float = Field(ge=0, description="Wall-clock seconds the selection took, end to end.")


MIX_SEARCH = "search.json"  # in a `tokenmill mix search` folder: its proxies, fit, answer and ``cost``


def read_mix_search_cost(search_dir: Path) -> SelectCost | None:
    """The proxy compute of a ``tokenmill mix search`` folder (the ``cost`` in its ``search.json``), which
    comparisons charge to a run trained on the mixture it found; None when the search never finished."""
    path = Path(search_dir) / MIX_SEARCH
    data = read_json(path)
    if data is None:
        return None
    try:
        return SelectCost.model_validate(data.get("cost") if isinstance(data, dict) else data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors())
        raise TokenmillError(f"{path}: no valid cost record ({problems}); rerun `tokenmill mix search` with the "
                             f"same --out to rewrite it") from None


class StageRecord(_Record):
    """What a stage's outputs were made from: the recipe fields it reads (``inputs``, keyed by their
    dotted recipe path) and a fingerprint of those and of every upstream stage's."""

    fingerprint: str
    inputs: dict[str, Any]


class DomainBpb(_Record):
    bpb: float
    docs: int
    bytes: int
    tokens: int
    nll_bits: float


class BpbResult(_Record):
    """``eval/bpb.json``: bits per byte of the held-out documents, per domain and pooled."""

    model_config = ConfigDict(extra="allow")  # the scorer may add settings (seq_len, stride) beside the figures

    domains: dict[str, DomainBpb]
    overall: DomainBpb
    macro_bpb: float



class ObjectiveFigures(_Record):
    """One domain's (or all domains' pooled) figures of a non-causal objective on fixed held-out windows.
    Which fields are set depends on the objective: mlm the masked-token and pseudo-log-likelihood ones,
    electra the generator's masked-token and the discriminator's replaced-token ones, span_corruption the
    target ones. Counts are what the pooled figures were divided by."""

    windows: int
    tokens: int
    masked_tokens: int | None = None  # mlm, electra: tokens chosen for prediction
    masked_accuracy: float | None = None  # mlm, electra (the generator's): argmax = the original token
    mlm_loss: float | None = None  # nats per masked token
    pll_bpb: float | None = None  # mlm: -Σ log2 p(token | all others) / UTF-8 bytes (Salazar et al. 2020)
    pll_windows: int | None = None  # the windows PLL scored (the first pll_windows_per_domain)
    pll_tokens: int | None = None
    pll_bytes: int | None = None
    pll_nats: float | None = None  # -Σ log p, the numerator of pll_bpb in nats
    rtd_accuracy: float | None = None  # electra: replaced-or-original right, over every position
    replaced_share: float | None = None  # share of positions the generator's sample changed
    rtd_recall: float | None = None  # share of the replaced positions the discriminator flagged
    target_tokens: int | None = None  # span_corruption: decoder targets scored (sentinels and EOS included)
    span_loss: float | None = None  # nats per target token, teacher-forced
    span_accuracy: float | None = None  # argmax = the target token


class ObjectiveProbe(_Record):
    """Cross-validated accuracy of a linear classifier telling the held-out domains apart from the
    encoder's mean-pooled final hidden states, and the majority-class share it must beat."""

    accuracy: float
    baseline: float
    folds: int
    windows: int
    domains: int


class ObjectiveSettings(_Record):
    step: int  # the checkpoint evaluated
    window_len: int  # tokens per window (the objective's training window)
    max_windows_per_domain: int
    pll_windows_per_domain: int | None = None  # mlm: PLL costs a forward per token, so it scores only these
    batch_size: int
    seed: int  # the run's: masks, corruption and generator samples are seeded from it and each window's index
    device: str
    domains_without_a_window: list[str] | None = None  # held-out domains shorter than one window: not evaluated


class ObjectiveResult(_Record):
    """``eval/objective.json``: how a masked LM, ELECTRA or span-corruption run does on the held-out tokens,
    per domain and pooled (``overall``), and the linear domain probe of its encoder."""

    objective: Literal["mlm", "electra", "span_corruption"]
    domains: dict[str, ObjectiveFigures]
    overall: ObjectiveFigures
    probe: ObjectiveProbe | None = None  # None with a single held-out domain
    settings: ObjectiveSettings


class FigureInfo(NamedTuple):
    label: str
    unit: str
    higher_is_better: bool
    tokenizer_free: bool  # comparable between runs with different tokenizers


# The headline figures of each objective, in display order, as the report and ``tokenmill compare`` show them.
OBJECTIVE_FIGURES: dict[str, FigureInfo] = {
    "probe_accuracy": FigureInfo("domain probe accuracy", "", True, True),
    "pll_bpb": FigureInfo("pseudo-log-likelihood bits per byte", "bits/byte", False, True),
    "masked_accuracy": FigureInfo("masked-token accuracy", "", True, False),
    "mlm_loss": FigureInfo("MLM loss", "nats/masked token", False, False),
    "rtd_accuracy": FigureInfo("replaced-token detection accuracy", "", True, False),
    "span_loss": FigureInfo("span-corruption loss", "nats/target token", False, False),
    "span_accuracy": FigureInfo("span-corruption target accuracy", "", True, False),
}


def harness_rows(result: dict) -> list[tuple[str, str, float, float | None, bool | None]]:
    """``(task, metric, value, stderr, higher_is_better)`` of each metric in a ``harness.json``; a metric
    under a filter other than lm_eval's ``none`` is named ``metric,filter``."""
    rows = []
    for task, metrics in result["results"].items():
        better = result.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, metric if filter_name == "none" else key, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None, better.get(metric)))
    return rows


def membership_source(result: dict) -> str:
    """Which texts a ``membership.json`` compared, in a sentence."""
    auto = result["source"].get("auto")
    if not auto:
        return (f"{result['members']} texts from {result['source']['members']} against "
                f"{result['nonmembers']} from {result['source']['nonmembers']}")
    epochs = auto.get("epochs_seen")
    return (f"{result['members']} curated training documents against as many held-out ones, matched per domain "
            f"({', '.join(f'{d}: {k}' for d, k in auto['per_domain'].items())})"
            + (f"; the model saw {epochs:.2f} epochs of its training tokens" if epochs else ""))


class StepFolder:
    """``curate/read/`` or ``curate/NN-STEP/``: kept documents, rejected ones and counts, side by side."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = self.root.name
        self.documents = self.root / "documents"
        self.rejected = self.root / "rejected"
        self.stats = self.root / "stats.json"
        self._shard_stats = self.root / "shards"

    def shard_stats(self, shard: Path) -> Path:
        """Where the counts of input shard ``shard`` go; the file marks that shard done."""
        return self._shard_stats / Path(shard).name.replace(".parquet", ".json")

    @property
    def done(self) -> bool:
        return self.stats.is_file()

    def read_stats(self) -> StepStats:
        stats = StepStats.read(self.stats)
        if stats is None:
            raise TokenmillError(f"{self.root}: step not complete (no stats.json)")
        return stats


class RunFolder:
    """Paths of one run folder and the reading, writing and locking of what is in it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.format_file = self.root / "tokenmill.json"
        self.lock_file = self.root / ".lock"
        self.recipe = self.root / "recipe.yaml"
        self.timings = self.root / "timings.json"
        self.stages = self.root / "stages.json"
        self.curate = self.root / "curate"
        self.read = StepFolder(self.curate / "read")
        self.final = self.curate / "final.json"
        self.heldout = self.root / "heldout" / "documents.parquet"
        self.heldout_shard = self.root / "heldout" / "shards" / "shard-00000.parquet"
        self.select_cost = self.root / "select_cost.json"
        self.tokens = self.root / "tokens"
        self.tokenizer = self.tokens / "tokenizer"
        self.train_tokens = self.tokens / "train"
        self.heldout_tokens = self.tokens / "heldout"
        self.train = self.root / "train"
        self.checkpoints = self.train / "checkpoints"
        self.metrics = self.train / "metrics.jsonl"
        self.summary = self.train / "summary.json"
        self.model = self.root / "model"
        self.eval = self.root / "eval"
        self.bpb = self.eval / "bpb.json"
        self.objective_eval = self.eval / "objective.json"
        self.harness = self.eval / "harness.json"
        self.membership = self.eval / "membership.json"
        self.report = self.root / "report.html"

    # ---- what kind of folder this is -------------------------------------------------------------
    def require(self) -> "RunFolder":
        """This folder, if it is a run folder of this layout; else a TokenmillError saying what it is."""
        if not self.recipe.is_file():
            raise TokenmillError(f"{self.root} is not a run folder (no recipe.yaml): make one with "
                                 f"`tokenmill run RECIPE --out {self.root}`")
        found = (read_json(self.format_file) or {}).get("format", 1)
        if found != FORMAT:
            raise TokenmillError(f"{self.root} is a run folder of layout {found}, this tokenmill reads layout "
                                 f"{FORMAT}: rerun its recipe into a new folder with this version")
        return self

    def create(self) -> None:
        """Make the folder, or say in one line why it cannot be made."""
        for parent in [self.root, *self.root.parents]:
            if parent.exists() and not parent.is_dir():
                raise TokenmillError(f"cannot make run folder {self.root}: {parent} is a file, not a folder")
        self.root.mkdir(parents=True, exist_ok=True)

    def stamp(self) -> None:
        """Mark a new run folder with this layout's version."""
        write_json_atomic({"format": FORMAT}, self.format_file)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one writer. The lock is an ``flock`` on ``.lock``, which the kernel releases
        when its holder dies, so a ``kill -9``-ed run never leaves the folder stuck; a second writer is
        refused at once with the holder's pid, host and command."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise TokenmillError(f"{self.root} is in use by {holder}; wait for it to finish, or stop it "
                                 f"and rerun") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)})\n".encode())
            yield
        finally:
            os.ftruncate(fd, 0)
            os.close(fd)

    # ---- curation --------------------------------------------------------------------------------
    def step(self, index: int, name: str) -> StepFolder:
        """The folder of the ``index``-th (0-based) curation step, named ``name``."""
        return StepFolder(self.curate / f"{index + 1:02d}-{name}")

    def steps(self) -> list[StepFolder]:
        """The read stage and every completed curation step, in order."""
        if not self.curate.is_dir():
            return []
        numbered = sorted(p for p in self.curate.iterdir() if p.is_dir() and p.name[:2].isdigit())
        return [f for f in [self.read, *map(StepFolder, numbered)] if f.done]

    def write_final(self, step: StepFolder) -> None:
        write_json_atomic({"documents": str(step.documents.relative_to(self.root))}, self.final)

    def curated_documents(self) -> Path:
        """The folder of the curated documents (the last step's kept shards)."""
        final = read_json(self.final)
        if final is None:
            raise TokenmillError(f"{self.root}: curation has not finished ({self.final} is missing); "
                                 f"run `tokenmill run` to complete it")
        return self.root / final["documents"]

    # ---- stages --------------------------------------------------------------------------------------
    def stage_outputs(self, stage: str) -> list[Path]:
        """What a stage writes, so a stage whose inputs changed can be removed and redone. A curation
        step is the stage ``curate/NN-STEP``; ``curate`` itself is the choice of the final documents."""
        if stage.startswith("curate/"):
            return [self.root / stage]
        return {
            "read": [self.read.root, self.heldout.parent],
            "curate": [self.final, self.select_cost],
            "tokenizer": [self.tokenizer],
            "pack": [self.train_tokens, self.heldout_tokens, self.heldout_shard.parent],
            "train": [self.train],
            "export": [self.model],
            "eval": [self.bpb, self.objective_eval],
        }[stage]

    def read_stage_records(self) -> dict[str, StageRecord]:
        data = read_json(self.stages) or {}
        try:
            return {name: StageRecord.model_validate(record) for name, record in data.items()}
        except ValidationError as err:
            raise TokenmillError(f"{self.stages}: not a valid stage record ({err.error_count()} errors); "
                                 f"delete it to redo every stage") from None

    def write_stage_records(self, records: dict[str, StageRecord]) -> None:
        write_json_atomic({name: r.model_dump(mode="json") for name, r in records.items()}, self.stages)

    # ---- records -----------------------------------------------------------------------------------
    def read_select_cost(self) -> SelectCost | None:
        return SelectCost.read(self.select_cost)

    def write_select_cost(self, flops: float, seconds: float) -> None:
        SelectCost(flops=flops, seconds=seconds).write(self.select_cost)

    def read_metrics(self) -> list[dict[str, Any]] | None:
        """``train/metrics.jsonl``: one record per logged step (``step``, ``tokens`` and the figures)."""
        return read_jsonl(self.metrics)

    def read_bpb(self) -> BpbResult | None:
        return BpbResult.read(self.bpb)

    def read_objective_eval(self) -> ObjectiveResult | None:
        return ObjectiveResult.read(self.objective_eval)

    def read_timings(self) -> dict[str, float]:
        return read_json(self.timings) or {}
