"""The run folder as users meet it: one writer at a time, a layout the standard tools read, and
one-line errors for the ordinary mistakes of pointing it somewhere it cannot live."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tokenmill import TokenmillError
from tokenmill.cli import main
from tokenmill.runfolder import RunFolder

from test_run import TINY

CURATE_ONLY = {**TINY, "curate": {**TINY["curate"], "workers": 1}}


def _recipe(tmp_path: Path, recipe: dict = CURATE_ONLY) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("curated")
    assert main(["run", str(_recipe(tmp)), "--out", str(tmp / "run"), "--no-progress", "--until", "curate"]) == 0
    return tmp / "run"


def _hold_lock(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from tokenmill.runfolder import RunFolder\n"
            f"with RunFolder({str(run)!r}).lock():\n    print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold_lock(run)
    try:
        t0 = time.perf_counter()
        assert main(["run", str(_recipe(tmp_path)), "--out", str(run), "--no-progress", "--until", "read"]) == 2
        assert time.perf_counter() - t0 < 30
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and "\n" not in err.strip()
        assert not (run / "curate").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunFolder(run).lock():  # the kernel released the dead holder's lock
        pass


def test_until_curate_says_it_stopped_and_wrote_no_report(tmp_path, capsys):
    assert main(["run", str(_recipe(tmp_path)), "--out", str(tmp_path / "run"), "--no-progress",
                 "--until", "curate"]) == 0
    out = capsys.readouterr().out
    assert "stopped after curate" in out and "report.html" not in out
    assert not (tmp_path / "run" / "report.html").exists()


def test_kept_documents_load_with_datasets_as_exactly_the_kept_ones(curated, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = RunFolder(curated)
    steps = folder.steps()
    assert [s.name for s in steps][:2] == ["read", "01-normalize"]
    for step in steps:
        stats = step.read_stats()
        kept = sum(pq.read_metadata(p).num_rows for p in step.documents.glob("shard-*.parquet"))
        assert kept == stats.kept_docs
        by_builder = datasets.load_dataset("parquet", data_dir=str(step.documents), split="train",
                                           cache_dir=str(tmp_path / "hf"))
        by_folder = datasets.load_dataset(str(step.documents), split="train", cache_dir=str(tmp_path / "hf"))
        assert by_builder.num_rows == by_folder.num_rows == stats.kept_docs
        assert set(by_folder["id"]).isdisjoint(
            i for p in step.rejected.glob("shard-*.parquet") for i in pq.read_table(p, columns=["id"])["id"].to_pylist())
    assert any(s.read_stats().removed_docs for s in steps)  # the check above saw rejected documents
    assert folder.curated_documents() == steps[-1].documents


def test_a_run_folder_of_another_layout_is_refused_by_name(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.raises(TokenmillError, match="layout 1"):
        RunFolder(tmp_path).require()
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize("out", ["file", "under_file", "proc", "sys"])
def test_an_out_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, out):
    (tmp_path / "a_file").write_text("x")
    path = {"file": tmp_path / "a_file", "under_file": tmp_path / "a_file" / "run",
            "proc": Path("/proc/tokenmill-test/run"), "sys": Path("/sys/tokenmill-test-run")}[out]
    assert main(["run", str(_recipe(tmp_path)), "--out", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmill: error:") and "\n" not in err and str(path.parent if out == "proc" else path) in err


def test_a_full_device_is_a_one_line_error_naming_the_file(tmp_path, capsys, monkeypatch):
    recipe = str(_recipe(tmp_path))
    real_write = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith("recipe.yaml"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["run", recipe, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and str(tmp_path / "run") in err and "\n" not in err


def test_yaml_errors_in_overrides_and_seq_len_past_the_model_are_caught_by_validate(tmp_path, capsys):
    recipe = str(_recipe(tmp_path))
    assert main(["validate", recipe, "--set", "train.lr=[1"]) == 2
    assert "--set 'train.lr=[1'" in capsys.readouterr().err
    assert main(["validate", recipe, "--set", "train.seq_len=128", "--set", "train.global_batch_tokens=512"]) == 2
    assert "train.seq_len=128 is longer than model.max_seq_len=64" in capsys.readouterr().err


def test_inspect_shows_what_a_removed_duplicate_duplicated_and_how_near(tmp_path, capsys):
    text = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
    rows = [{"id": "a", "text": text}, {"id": "b", "text": text}, {"id": "c", "text": "Something else entirely."}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "dups", "sources": [{"path": str(tmp_path / "docs.jsonl"), "domain": "d"}],
              "heldout": {"fraction": 0.0}, "curate": {"workers": 1, "steps": [{"step": "exact_dedup"}]}}
    run = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, recipe)), "--out", str(run), "--no-progress", "--until", "curate"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run), "--step", "exact_dedup"]) == 0
    assert "[b] (duplicate of a, similarity 1.00)" in capsys.readouterr().out
