"""The step pipeline: per-step folders, stats by reason, rejected documents kept, resume per shard."""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.curate.base import FilterStep, Step, StepParams, StepResult
from tokenmill.curate.pipeline import run_pipeline
from tokenmill.runfolder import RunFolder
from tokenmill.documents.schema import make_table
from tokenmill.documents.shards import list_shards, write_parquet_atomic
from tokenmill.executors import LocalExecutor


class DropOdd(FilterStep):
    """Removes documents whose number is odd (ids look like doc-N)."""

    class Params(StepParams):
        step: Literal["drop_odd"] = "drop_odd"

    def reasons(self, table: pa.Table) -> np.ndarray:
        nums = np.array([int(i.split("-")[1]) for i in table.column("id").to_pylist()])
        return np.where(nums % 2 == 1, "odd", "")


class KeepFirstOfEachText(Step):
    """A whole-corpus step: remembers the first id of each text during fit."""

    class Params(StepParams):
        step: Literal["first_text"] = "first_text"

    def fit_map(self, table):
        return list(zip(table.column("text").to_pylist(), table.column("id").to_pylist()))

    def fit_reduce(self, parts):
        self.first: dict[str, str] = {}
        for part in parts:
            for text, doc_id in part:
                self.first.setdefault(text, doc_id)

    def process(self, table) -> StepResult:
        reasons = ["" if self.first[t] == i else "repeat"
                   for t, i in zip(table.column("text").to_pylist(), table.column("id").to_pylist())]
        return self.split(table, reasons)


def _write_input(root, n_shards=3, per_shard=10):
    src = root / "read"
    for s in range(n_shards):
        rows = [{"id": f"doc-{s * per_shard + i}", "text": f"text {(s * per_shard + i) % 7}", "domain": "d",
                 "source": "t", "meta": "{}"} for i in range(per_shard)]
        write_parquet_atomic(make_table(rows), src / f"shard-{s:05d}.parquet")
    return src


def test_pipeline_counts_and_keeps_rejects(tmp_path):
    src = _write_input(tmp_path)
    with LocalExecutor(workers=2, progress=False) as ex:
        last, stats = run_pipeline([DropOdd(), KeepFirstOfEachText()], src, RunFolder(tmp_path), ex)
    assert last.name == "02-first_text"
    assert stats[0].input_docs == 30 and stats[0].removed == {"odd": 15}
    assert stats[1].input_docs == 15 and stats[1].kept_docs == 7  # 7 distinct texts survive
    assert stats[1].removed == {"repeat": 8}
    kept = pa.concat_tables(pq.read_table(p) for p in list_shards(last.documents))
    texts = kept.column("text").to_pylist()
    assert len(set(texts)) == len(texts) == 7
    rejected = pa.concat_tables(pq.read_table(p) for p in list_shards(tmp_path / "curate" / "01-drop_odd" / "rejected"))
    assert set(pc.unique(rejected.column("reason")).to_pylist()) == {"odd"}
    assert set(rejected.column("step").to_pylist()) == {"drop_odd"}
    # nothing silently lost: input = kept + removed at every step
    for s in stats:
        assert s.input_docs == s.kept_docs + s.removed_docs
        assert s.input_bytes >= s.kept_bytes


def test_pipeline_resumes_unfinished_step_per_shard(tmp_path):
    src = _write_input(tmp_path)
    root = RunFolder(tmp_path)
    with LocalExecutor(workers=1, progress=False) as ex:
        run_pipeline([DropOdd()], src, root, ex)
    step_dir = tmp_path / "curate" / "01-drop_odd"
    # Simulate a kill after shard 0 was written: remove the step total and the other shards' outputs.
    (step_dir / "stats.json").unlink()
    for s in (1, 2):
        (step_dir / "shards" / f"shard-{s:05d}.json").unlink()
        (step_dir / "documents" / f"shard-{s:05d}.parquet").unlink()
    mtime0 = (step_dir / "documents" / "shard-00000.parquet").stat().st_mtime_ns
    with LocalExecutor(workers=1, progress=False) as ex:
        _, stats = run_pipeline([DropOdd()], src, root, ex)
    assert (step_dir / "documents" / "shard-00000.parquet").stat().st_mtime_ns == mtime0  # not redone
    assert stats[0].kept_docs == 15 and stats[0].shards == 3
    assert json.loads((step_dir / "stats.json").read_text())["removed"] == {"odd": 15}
