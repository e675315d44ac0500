"""The Ray executor: the same steps give the same documents and stats as the local pool."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")

from tokenmill import TokenmillError
from tokenmill.curate.base import FilterStep, StepParams
from tokenmill.curate.pipeline import run_pipeline
from tokenmill.documents.shards import list_shards
from tokenmill.executors import LocalExecutor
from tokenmill.executors.ray import RayExecutor
from tokenmill.runfolder import RunFolder

from test_pipeline import DropOdd, KeepFirstOfEachText, _write_input


class FailOnShard(FilterStep):
    """Raises a user error on one shard, as a step does on bad data."""

    class Params(StepParams):
        step: Literal["fail_on_shard"] = "fail_on_shard"

    def reasons(self, table: pa.Table) -> np.ndarray:
        if "doc-63" in table.column("id").to_pylist():
            raise TokenmillError("bad document doc-63")
        return np.full(table.num_rows, "")


def _documents(folder):
    table = pa.concat_tables(pq.read_table(p) for p in list_shards(folder))
    return list(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


def _without_seconds(stats):
    return [s.model_dump(exclude={"seconds", "wall_seconds"}) for s in stats]


@pytest.fixture(scope="module")
def ray_executor():
    with RayExecutor(num_cpus=2, progress=False) as ex:
        yield ex


def test_ray_matches_local_document_for_document(tmp_path, ray_executor):
    src = _write_input(tmp_path, n_shards=6, per_shard=40)
    steps = [DropOdd(), KeepFirstOfEachText()]
    with LocalExecutor(workers=2, progress=False) as local:
        local_last, local_stats = run_pipeline(steps, src, RunFolder(tmp_path / "local"), local)
    ray_last, ray_stats = run_pipeline(steps, src, RunFolder(tmp_path / "ray"), ray_executor)
    local_docs = _documents(local_last.documents)
    assert 0 < len(local_docs) < 240  # both steps removed something, so the comparison means something
    assert _documents(ray_last.documents) == local_docs
    assert _without_seconds(ray_stats) == _without_seconds(local_stats)
    for step in ("01-drop_odd", "02-first_text"):
        assert (_documents(tmp_path / "ray" / "curate" / step / "rejected")
                == _documents(tmp_path / "local" / "curate" / step / "rejected"))


def _square(x: int) -> int:
    return x * x


def test_ray_map_keeps_input_order_past_the_window(ray_executor):
    items = list(range(25))  # more than the in-flight window of 2 tasks per CPU
    assert ray_executor.map(_square, items) == [x * x for x in items]


def test_ray_raises_the_steps_own_error(tmp_path, ray_executor):
    src = _write_input(tmp_path, n_shards=6, per_shard=40)
    with pytest.raises(TokenmillError, match="bad document doc-63"):
        run_pipeline([FailOnShard()], src, RunFolder(tmp_path / "ray"), ray_executor)


def test_ray_rejects_num_cpus_with_an_address():
    with pytest.raises(TokenmillError, match="ray_address"):
        RayExecutor(address="auto", num_cpus=2)


def test_a_recipe_curated_on_ray_equals_the_local_run(tmp_path, ray_executor):
    from tokenmill.recipe import parse_recipe
    from tokenmill.run import Runner

    from test_run import TINY

    folders = {}
    for executor in ("local", "ray"):
        recipe = {**TINY, "curate": {**TINY["curate"], "executor": executor}}
        runner = Runner(parse_recipe(recipe), tmp_path / executor, progress=False)
        runner.run(until="curate")
        folders[executor] = runner.curated_shards()
    assert [p.name for p in folders["ray"]] == [p.name for p in folders["local"]]
    for ray_shard, local_shard in zip(folders["ray"], folders["local"]):
        assert pq.read_table(ray_shard).equals(pq.read_table(local_shard))
    assert sum(pq.read_metadata(p).num_rows for p in folders["ray"]) > 0
