"""The whole loop through the CLI: a tiny recipe end to end, resume after kill -9, recipe errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tokenmill.cli import main
from tokenmill.runfolder import RunFolder

from conftest import DEMO_DATA

TINY = {
    "name": "tiny",
    "sources": [{"path": str(DEMO_DATA / f"{d}.jsonl.gz"), "domain": d}
                for d in ("bible", "shakespeare", "python_docs")],
    "heldout": {"fraction": 0.05, "max_docs_per_domain": 3, "min_docs_per_domain": 1},
    "curate": {"shard_docs": 40, "workers": 2, "steps": [
        {"step": "normalize"}, {"step": "length_filter", "min_words": 50},
        {"step": "gopher_repetition"}, {"step": "exact_dedup"}, {"step": "minhash_dedup"}]},
    "tokenizer": {"vocab_size": 512},
    "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
    "train": {"seq_len": 64, "micro_batch_size": 4, "global_batch_tokens": 256, "max_steps": 24,
              "warmup_steps": 2, "lr": 3e-3, "eval_every": 12, "eval_windows_per_domain": 2,
              "ckpt_every": 4, "log_every": 4},
    "eval": {"max_docs_per_domain": 1, "batch_size": 4},
}


def _write_recipe(tmp_path: Path, recipe: dict = TINY) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def _documents(run: Path) -> pa.Table:
    final = json.loads((run / "curate" / "final.json").read_text())["documents"]
    return pa.concat_tables(pq.read_table(p) for p in sorted((run / final).glob("shard-*.parquet")))


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    proc = _cli("run", str(_write_recipe(tmp)), "--out", str(tmp / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_run_folder_is_complete(full_run):
    for rel in ("recipe.yaml", "timings.json", "heldout/documents.parquet", "curate/read/stats.json",
                "tokens/tokenizer/tokenizer.json", "tokens/train/index.parquet", "tokens/heldout/meta.json",
                "train/metrics.jsonl", "train/summary.json", "model/config.json", "model/model.safetensors",
                "eval/bpb.json", "report.html"):
        assert (full_run / rel).exists(), rel
    timings = json.loads((full_run / "timings.json").read_text())
    assert set(timings) >= {"read", "curate", "tokenizer", "pack", "train", "export", "eval", "report"}
    bpb = json.loads((full_run / "eval" / "bpb.json").read_text())
    assert set(bpb["domains"]) == {"bible", "shakespeare", "python_docs"}
    assert all(0 < d["bpb"] < 8 for d in bpb["domains"].values())
    # every document read is accounted for: held out, kept, or removed with a reason
    read = json.loads((full_run / "curate" / "read" / "stats.json").read_text())
    steps = sorted(p for p in (full_run / "curate").iterdir() if p.name[:2].isdigit())
    chain = read["kept_docs"]
    for step in steps:
        stats = json.loads((step / "stats.json").read_text())
        assert stats["input_docs"] == chain
        chain = stats["kept_docs"]
        assert stats["input_docs"] == stats["kept_docs"] + sum(stats["removed"].values())
    assert _documents(full_run).num_rows == chain
    assert read["input_docs"] == read["kept_docs"] + read["counters"]["heldout_docs"] + read["removed_docs"]


def test_hf_export_loads_and_matches(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.train.checkpoint import load_trained_model

    hf = AutoModelForCausalLM.from_pretrained(full_run / "model").eval()
    tok = AutoTokenizer.from_pretrained(full_run / "model")
    ours, _ = load_trained_model(full_run / "train" / "checkpoints")
    ids = torch.tensor([tok.encode("In the beginning God created the heaven and the earth.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_rerun_skips_everything(full_run):
    proc = _cli("run", str(full_run / "recipe.yaml"), "--out", str(full_run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for stage in ("read", "curate", "tokenizer", "pack", "train", "export", "eval"):
        assert f"{stage}: already complete" in proc.stdout


def test_resume_after_kill_matches_uninterrupted(full_run, tmp_path):
    recipe = _write_recipe(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "run", str(recipe), "--out", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpts = out / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpts.glob("step-*[0-9]")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / "summary.json").exists()

    again = _cli("run", str(recipe), "--out", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "curate: already complete" in again.stdout
    assert _documents(out).equals(_documents(full_run))
    meta = lambda run: json.loads((run / "tokens" / "train" / "meta.json").read_text())["n_tokens"]
    assert meta(out) == meta(full_run)
    assert _losses(out) == _losses(full_run)  # bit-identical continuation on CPU, no duplicated lines


def test_validate_reports_every_error(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["train"]["max_steps"] = "many"
    bad["model"]["dim"] = -1
    bad["curate"]["steps"][1]["min_wordz"] = 3
    bad["curate"]["steps"].append({"step": "no_such_step"})
    proc = _cli("validate", str(_write_recipe(tmp_path, bad)))
    assert proc.returncode == 2
    err = proc.stderr
    assert "4 error(s)" in err or "error(s)" in err
    for needle in ("train.max_steps", "model.dim", "curate.steps.1.length_filter.min_wordz",
                   "curate.steps.5", "no_such_step"):
        assert needle in err, (needle, err)
    assert "Traceback" not in err


def test_missing_recipe_and_bad_override_are_clear(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["validate", str(_write_recipe(tmp_path)), "--set", "train.max_steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["validate", str(_write_recipe(tmp_path)), "--set", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_different_recipe_into_same_folder_is_refused(full_run, capsys):
    assert main(["run", str(full_run / "recipe.yaml"), "--out", str(full_run), "--set", "train.max_steps=5",
                 "--no-progress"]) == 2
    assert "different recipe" in capsys.readouterr().err


def test_until_stops_after_a_stage_and_rejects_unknown_ones(tmp_path, capsys):
    recipe = _write_recipe(tmp_path)
    assert main(["run", str(recipe), "--out", str(tmp_path / "r"), "--until", "packing", "--no-progress"]) == 2
    assert "not a stage" in capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(tmp_path / "r"), "--until", "pack", "--no-progress"]) == 0
    assert (tmp_path / "r" / "tokens" / "heldout" / "meta.json").exists()
    assert not (tmp_path / "r" / "train").exists()


def test_model_based_selection_records_its_cost_for_compare(tmp_path):
    from tokenmill.recipe import parse_recipe
    from tokenmill.run import Runner

    recipe = json.loads(json.dumps(TINY))
    recipe["curate"]["workers"] = 1
    recipe["curate"]["steps"] = [{
        "step": "color_filter", "target": {"domains": ["python_docs"], "max_docs": 8},
        "keep": {"top_fraction": 0.5}, "sample_docs": 40, "target_steps": 4,
        "proxy": {"dim": 32, "n_layers": 1, "n_heads": 2, "seq_len": 64, "batch_size": 4, "steps": 6,
                  "vocab_size": 300, "max_score_chars": 300}}]
    runner = Runner(parse_recipe(recipe), tmp_path / "run", progress=False)
    runner.run(until="curate")
    stats = json.loads((tmp_path / "run" / "curate" / "01-color_filter" / "stats.json").read_text())
    cost = RunFolder(tmp_path / "run").read_select_cost()
    assert cost is not None and cost.flops == stats["counters"]["proxy_flops"] > 0 and cost.seconds > 0


def test_readme_recipe_and_bundled_recipes_validate():
    from tokenmill.recipe import load_recipe, parse_recipe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("## A recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    assert parse_recipe(yaml.safe_load(example)).model.preset == "124M"
    for recipe in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"):
        load_recipe(recipe)
