"""Run an ordered list of steps over Parquet shards, one StepFolder per step, resumable per shard.

Step ``i`` named ``n`` writes ``curate/<i:02d>-<n>/`` (see ``tokenmill.runfolder``): the kept documents
under ``documents/`` (one output shard per input shard), removed ones under ``rejected/``, each shard's
counts under ``shards/`` (their presence marks the shard done) and the step's totals in ``stats.json``
(its presence marks the step done). A rerun skips finished steps and, inside an unfinished step,
finished shards. Fit state is recomputed rather than stored: it is a deterministic function of the
input shards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow.compute as pc

from tokenmill.curate.base import Step
from tokenmill.documents.shards import list_shards, read_shard, text_bytes, write_parquet_atomic
from tokenmill.runfolder import RunFolder, StepFolder, StepStats


def _fit_map(task: tuple[Step, Path]) -> Any:
    step, shard = task
    return step.fit_map(read_shard(shard))


def _process_shard(task: tuple[Step, Path, StepFolder, bool]) -> None:
    step, shard, out, keep_rejected = task
    t0 = time.perf_counter()
    table = read_shard(shard)
    result = step.process(table)
    write_parquet_atomic(result.kept, out.documents / shard.name)
    if keep_rejected and result.removed.num_rows:
        write_parquet_atomic(result.removed, out.rejected / shard.name)
    reasons = (pc.value_counts(result.removed.column("reason")).to_pylist()
               if result.removed.num_rows else [])
    StepStats(step=step.name, input_docs=table.num_rows, input_bytes=text_bytes(table),
              kept_docs=result.kept.num_rows, kept_bytes=text_bytes(result.kept),
              removed_docs=result.removed.num_rows, removed={r["values"]: r["counts"] for r in reasons},
              counters=dict(result.counters), seconds=time.perf_counter() - t0).write(out.shard_stats(shard))


def run_step(step: Step, input_dir: Path, out: StepFolder, executor, keep_rejected: bool) -> StepStats:
    """Run one step over every shard of ``input_dir`` into ``out``; return its totals (reused if done)."""
    if out.done:
        return out.read_stats()
    t0 = time.perf_counter()
    shards = list_shards(input_dir)
    for _ in range(step.fit_rounds):
        step.fit_reduce(executor.map(_fit_map, [(step, s) for s in shards], desc=f"{step.name} fit"))
    todo = [s for s in shards if not out.shard_stats(s).exists()]
    executor.map(_process_shard, [(step, s, out, keep_rejected) for s in todo], desc=step.name)
    total = StepStats.merge(step.name, [StepStats.read(out.shard_stats(s)) for s in shards])
    total.wall_seconds = time.perf_counter() - t0
    total.write(out.stats)
    return total


def run_pipeline(steps: Sequence[Step], input_dir: Path, folder: RunFolder, executor,
                 keep_rejected: bool = True) -> tuple[StepFolder, list[StepStats]]:
    """Run ``steps`` in order from the documents in ``input_dir``; return the last step's folder and each
    step's stats."""
    all_stats = []
    current = folder.read
    for i, step in enumerate(steps):
        out = folder.step(i, step.name)
        all_stats.append(run_step(step, input_dir, out, executor, keep_rejected))
        current, input_dir = out, out.documents
    return current, all_stats
