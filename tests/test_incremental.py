"""Reruns with a changed recipe redo only the stages downstream of the change, as a build system does,
and say which stages they reuse and why the others rerun."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from tokenmill.cli import main
from tokenmill.runfolder import RunFolder

from test_run import TINY

BASE = copy.deepcopy(TINY)
BASE["curate"]["workers"] = 1
BASE["train"].update(max_steps=8, eval_every=8, ckpt_every=4, log_every=4)
ALL = ["read", "curate", "tokenizer", "pack", "train", "export", "eval", "report"]


def _run(tmp_path: Path, recipe: dict, capsys, *extra: str) -> tuple[list[str], str]:
    """Run ``recipe`` into tmp_path/run; return the stages that ran (not reused) and the output."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress", *extra]) == 0
    out = capsys.readouterr().out
    return re.findall(r"^\[tokenmill\] (\w+) \.\.\.$", out, flags=re.M), out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def test_each_change_reruns_only_its_stage_and_what_follows(tmp_path, capsys):
    run = tmp_path / "run"
    ran, _ = _run(tmp_path, BASE, capsys)
    assert ran == ALL
    ran, out = _run(tmp_path, BASE, capsys)
    assert ran == ["report"] and "train: already complete, reused" in out

    recipe = copy.deepcopy(BASE)
    recipe["eval"]["batch_size"] = 2
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ["eval", "report"] and "eval: reruns (eval.batch_size 4 -> 2)" in out

    recipe["train"]["log_every"] = 2  # how training is watched: keeps the checkpoints and the model
    ran, _ = _run(tmp_path, recipe, capsys)
    assert ran == ["report"]

    first = [r for r in _metrics(run) if "loss" in r]
    recipe["train"]["max_steps"] = 12
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ["train", "export", "eval", "report"]
    assert "train: continues from step 8 to 12" in out
    continued = [r for r in _metrics(run) if "loss" in r]
    assert continued[:len(first)] == first and continued[-1]["step"] == 12  # resumed, not restarted
    assert json.loads((run / "model" / "tokenmill_export.json").read_text())["step"] == 12

    recipe["train"]["lr"] = 1e-3  # what training learns: retrain from scratch
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ["train", "export", "eval", "report"] and "train: reruns (train.lr 0.003 -> 0.001)" in out
    assert _metrics(run)[0]["step"] <= 2 and [r for r in _metrics(run) if "loss" in r] != continued

    recipe["tokenizer"]["vocab_size"] = 400
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ["tokenizer", "pack", "train", "export", "eval", "report"]
    assert "tokenizer: reruns (tokenizer.vocab_size 512 -> 400)" in out and "pack: reruns (upstream tokenizer" in out

    folder = RunFolder(run)
    before = {s.name: s.stats.stat().st_mtime_ns for s in folder.steps()}
    recipe["curate"]["steps"][2] = {"step": "gopher_repetition", "dup_line_frac": 0.25}
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ["curate", "tokenizer", "pack", "train", "export", "eval", "report"]
    assert "curate/03-gopher_repetition: reruns (curate.steps.2.dup_line_frac 0.3 -> 0.25)" in out
    after = {s.name: s.stats.stat().st_mtime_ns for s in folder.steps()}
    assert [n for n in after if after[n] == before[n]] == ["read", "01-normalize", "02-length_filter"]

    recipe["curate"]["steps"] = recipe["curate"]["steps"][:2]  # a step dropped: its folder goes
    ran, _ = _run(tmp_path, recipe, capsys, "--until", "curate")
    assert ran == ["curate"]
    assert [s.name for s in folder.steps()] == ["read", "01-normalize", "02-length_filter"]
    assert folder.curated_documents() == folder.curate / "02-length_filter" / "documents"

    recipe["heldout"]["max_docs_per_domain"] = 2
    ran, out = _run(tmp_path, recipe, capsys)
    assert ran == ALL and "read: reruns (heldout.max_docs_per_domain 3 -> 2)" in out


def test_training_cannot_be_shortened_and_the_refusal_names_the_field(tmp_path, capsys):
    _run(tmp_path, BASE, capsys)
    recipe = copy.deepcopy(BASE)
    recipe["train"]["max_steps"] = 4
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps 8 -> 4" in err and "tokenmill export" in err
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["max_steps"] == 8


def test_export_any_kept_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    recipe = copy.deepcopy(BASE)
    recipe["train"]["keep_last_k"] = 2
    _run(tmp_path, recipe, capsys, "--until", "train")
    run = tmp_path / "run"
    assert main(["export", str(run), "--step", "4"]) == 0
    out = run / "exports" / "step-4"
    assert json.loads((out / "tokenmill_export.json").read_text())["step"] == 4
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert main(["export", str(run), "--step", "3"]) == 2
    assert "no checkpoint of step 3" in capsys.readouterr().err
