"""Run an ordered list of steps over Parquet shards, one output folder per step, resumable per shard.

Layout for step ``i`` named ``n``::

    <root>/<i:02d>-<n>/shard-XXXXX.parquet          kept documents (one output shard per input shard)
    <root>/<i:02d>-<n>/rejected/shard-XXXXX.parquet removed documents with ``reason`` and ``step``
    <root>/<i:02d>-<n>/shard-XXXXX.stats.json       that shard's counts (its presence marks it done)
    <root>/<i:02d>-<n>/stats.json                   the step's totals (its presence marks the step done)

A rerun skips finished steps and, inside an unfinished step, finished shards. Fit state is recomputed
rather than stored: it is a deterministic function of the input shards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow.compute as pc

from tokenmill.curate.base import Step
from tokenmill.documents.shards import (list_shards, read_shard, text_bytes, write_json_atomic,
                                        write_parquet_atomic)


def step_dir_name(index: int, step: Step) -> str:
    return f"{index + 1:02d}-{step.name}"


def _fit_map(task: tuple[Step, Path]) -> Any:
    step, shard = task
    return step.fit_map(read_shard(shard))


def _process_shard(task: tuple[Step, Path, Path, bool]) -> dict:
    step, shard, out_dir, keep_rejected = task
    t0 = time.perf_counter()
    table = read_shard(shard)
    result = step.process(table)
    write_parquet_atomic(result.kept, out_dir / shard.name)
    if keep_rejected and result.removed.num_rows:
        write_parquet_atomic(result.removed, out_dir / "rejected" / shard.name)
    reasons = (pc.value_counts(result.removed.column("reason")).to_pylist()
               if result.removed.num_rows else [])
    stats = {
        "input_docs": table.num_rows,
        "input_bytes": text_bytes(table),
        "kept_docs": result.kept.num_rows,
        "kept_bytes": text_bytes(result.kept),
        "removed_docs": result.removed.num_rows,
        "removed": {r["values"]: r["counts"] for r in reasons},
        "counters": dict(result.counters),
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(stats, out_dir / shard.name.replace(".parquet", ".stats.json"))
    return stats


def merge_stats(step_name: str, parts: Sequence[dict]) -> dict:
    total: dict[str, Any] = {"step": step_name, "input_docs": 0, "input_bytes": 0, "kept_docs": 0,
                             "kept_bytes": 0, "removed_docs": 0, "removed": {}, "counters": {},
                             "seconds": 0.0, "shards": len(parts)}
    for part in parts:
        for key in ("input_docs", "input_bytes", "kept_docs", "kept_bytes", "removed_docs", "seconds"):
            total[key] += part[key]
        for group in ("removed", "counters"):
            for k, v in part[group].items():
                total[group][k] = total[group].get(k, 0) + v
    return total


def run_step(index: int, step: Step, input_dir: Path, root: Path, executor, keep_rejected: bool) -> dict:
    """Run one step over every shard of ``input_dir``; return its totals (reused if already done)."""
    out_dir = root / step_dir_name(index, step)
    final = out_dir / "stats.json"
    if final.exists():
        return json.loads(final.read_text())
    t0 = time.perf_counter()
    shards = list_shards(input_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(step.fit_rounds):
        step.fit_reduce(executor.map(_fit_map, [(step, s) for s in shards], desc=f"{step.name} fit"))
    todo = [s for s in shards if not (out_dir / s.name.replace(".parquet", ".stats.json")).exists()]
    executor.map(_process_shard, [(step, s, out_dir, keep_rejected) for s in todo], desc=step.name)
    parts = [json.loads((out_dir / s.name.replace(".parquet", ".stats.json")).read_text()) for s in shards]
    total = merge_stats(step.name, parts)
    total["wall_seconds"] = time.perf_counter() - t0
    write_json_atomic(total, final)
    return total


def run_pipeline(steps: Sequence[Step], input_dir: Path, root: Path, executor,
                 keep_rejected: bool = True) -> tuple[Path, list[dict]]:
    """Run ``steps`` in order from ``input_dir``; return the last output folder and each step's stats."""
    all_stats = []
    current = Path(input_dir)
    for i, step in enumerate(steps):
        all_stats.append(run_step(i, step, current, root, executor, keep_rejected))
        current = root / step_dir_name(i, step)
    return current, all_stats
