"""Discoverability and early checks: `tokenmill steps`, `tokenmill init`, what `validate` catches before a
run, the held-out column and step numbers of `tokenmill inspect`, and the final view of `tokenmill compare`."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from tokenmill.cli import main
from tokenmill.recipe import load_recipe
from tokenmill.steps import STEPS

from conftest import DEMO_DATA
from test_compare import fake_run, loss_curve
from test_run import TINY, _write_recipe


def _tiny(**changes) -> dict:
    recipe = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = recipe
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return recipe


def _validate_errors(tmp_path: Path, recipe: dict, capsys) -> str:
    assert main(["validate", str(_write_recipe(tmp_path, recipe))]) == 2
    return capsys.readouterr().err


# ---- tokenmill steps ---------------------------------------------------------------------------------

def test_steps_lists_every_step_with_its_docstring(capsys):
    assert main(["steps"]) == 0
    out = capsys.readouterr().out
    for name in STEPS:
        assert re.search(rf"^  {name}\s", out, re.M), name
    assert "Gopher's repetition rules, thresholds of table A1 as defaults." in out
    assert out.index("curation steps") < out.index("gopher_quality") < out.index("selection steps") < out.index("dsir")


def test_steps_name_prints_every_parameter_from_the_params_class(capsys):
    assert main(["steps", "length_filter"]) == 0
    out = capsys.readouterr().out
    assert "min_words: int | null, default null, >= 0" in out
    assert "Remove documents with fewer whitespace-separated words (None: no minimum)." in out
    assert main(["steps", "minhash_dedup"]) == 0
    out = capsys.readouterr().out
    params = re.findall(r"^  (\w+): ", out, re.M)
    assert params == [f for f in STEPS["minhash_dedup"].Params.model_fields if f != "step"]
    assert main(["steps", "color_filter"]) == 0
    out = capsys.readouterr().out
    assert "proxy.dim: int, default 64, > 0" in out and "target: TargetSet, required" in out
    assert main(["steps", "gopher_qualty"]) == 2
    assert "did you mean gopher_quality?" in capsys.readouterr().err


# ---- tokenmill init ----------------------------------------------------------------------------------

def test_init_writes_a_recipe_that_validates_and_runs_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "recipe.yaml"
    assert main(["init", str(DEMO_DATA), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# A starter recipe") and "(not README.md)" in text
    assert main(["validate", str(out)]) == 0
    recipe = load_recipe(out)
    assert [s.step for s in recipe.curate.steps][:2] == ["normalize", "length_filter"]
    run = tmp_path / "run"
    assert main(["run", str(out), "--out", str(run), "--no-progress", "--set", "train.max_steps=2",
                 "--set", "train.warmup_steps=1", "--set", "train.eval_every=2", "--set", "train.ckpt_every=2",
                 "--set", "tokenizer.vocab_size=512", "--set", "eval.max_docs_per_domain=1"]) == 0
    assert set(json.loads((run / "eval" / "bpb.json").read_text())["domains"]) == {
        "bible", "shakespeare", "python_docs"}  # a domain per file
    capsys.readouterr()
    out.write_text("mine")
    assert main(["init", str(DEMO_DATA), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine"


def test_init_reads_text_and_domain_fields_of_the_records(tmp_path):
    data = tmp_path / "data" / "mixed.jsonl.gz"
    data.parent.mkdir()
    with gzip.open(data, "wt") as fh:
        fh.writelines(json.dumps({"body": f"document {i} " * 20, "domain": "ab"[i % 2], "n": i}) + "\n"
                      for i in range(20))
    out = tmp_path / "recipe.yaml"
    assert main(["init", str(tmp_path / "data" / "*.jsonl.gz"), "--out", str(out)]) == 0
    source = yaml.safe_load(out.read_text())["sources"][0]
    assert source == {"path": "data/*.jsonl.gz", "text_field": "body", "domain_field": "domain"}
    assert load_recipe(out, preflight=True).sources[0].text_field == "body"


# ---- validate: early checks --------------------------------------------------------------------------

def test_validate_names_a_source_that_matches_no_file_beside_schema_errors(tmp_path, capsys):
    recipe = _tiny(train__max_steps="many")
    recipe["sources"].insert(1, {"path": str(tmp_path / "missing" / "*.jsonl")})
    err = _validate_errors(tmp_path, recipe, capsys)
    assert "2 error(s)" in err
    assert re.search(r"sources\.1\.path: .*missing/\*\.jsonl.* matches no file", err), err
    assert "train.max_steps" in err


def test_validate_refuses_a_warmup_as_long_as_training(tmp_path, capsys):
    err = _validate_errors(tmp_path, _tiny(train__warmup_steps=24), capsys)
    assert "train.warmup_steps: 24 is not below train.max_steps (24)" in err
    assert main(["validate", str(_write_recipe(tmp_path)), "--set", "train.warmup_steps=23"]) == 0


def test_validate_names_options_whose_package_is_missing(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb", "ray") else real(name, *a))
    recipe = _tiny(train__tensorboard=True, train__wandb={"project": "p"}, curate__executor="ray")
    err = _validate_errors(tmp_path, recipe, capsys)
    assert "3 error(s)" in err
    for path, package in (("train.tensorboard", "tensorboard"), ("train.wandb", "wandb"), ("curate.executor", "ray")):
        assert f"{path}: needs the {package} package, which is not installed" in err, err


def test_validate_suggests_the_nearest_step_and_field_name(tmp_path, capsys):
    recipe = _tiny(curate__steps__1__min_wordz=3, train__warmpu_steps=3, train__wandb={"project": "p", "mdoe": "x"})
    recipe["curate"]["steps"][2] = {"step": "gopher_qualty"}
    recipe["trian"] = {}
    err = _validate_errors(tmp_path, recipe, capsys)
    assert "5 error(s)" in err
    assert re.search(r"train\.wandb\.mdoe: .*; did you mean mode\?", err), err
    assert re.search(r"curate\.steps\.2: .*'gopher_qualty'.*; did you mean gopher_quality\?", err), err
    assert re.search(r"curate\.steps\.1\.length_filter\.min_wordz: .*; did you mean min_words\?", err), err
    assert re.search(r"train\.warmpu_steps: .*; did you mean warmup_steps\?", err), err
    assert re.search(r"trian: .*; did you mean train\?", err), err


# ---- inspect and compare -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("curated")
    assert main(["run", str(_write_recipe(tmp)), "--out", str(tmp / "run"), "--until", "curate", "--no-progress"]) == 0
    return tmp / "run"


def test_inspect_funnel_counts_held_out_documents(curated, capsys):
    assert main(["inspect", str(curated)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["step", "in", "docs", "kept", "removed", "held"]
    read = next(line.split() for line in lines if line.startswith("read "))
    total, kept, removed, held = map(int, read[1:5])
    assert held > 0 and total == kept + removed + held


def test_inspect_takes_a_step_by_number(curated, capsys):
    for step, header in (("3", "== 03-gopher_repetition:"), ("0", "== read:"), ("read", "== read:")):
        assert main(["inspect", str(curated), "--step", step, "--samples", "1"]) == 0, step
        assert header in capsys.readouterr().out, step
    assert main(["inspect", str(curated), "--step", "0"]) == 0
    assert re.search(r"== read: \d+ in, \d+ kept, \d+ removed, [1-9]\d* held out", capsys.readouterr().out)
    assert main(["inspect", str(curated), "--step", "9"]) == 2
    assert "5 05-minhash_dedup" in capsys.readouterr().err


def test_compare_prints_each_runs_final_values(tmp_path, capsys):
    a = fake_run(tmp_path / "a", evals=[512, 1024, 2048])
    b = fake_run(tmp_path / "b", evals=[768, 2304, 4096], curve=loss_curve(0.9))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    final = out.split("\nfinal (each run at its end: a 2,048 tokens, b 4,096 tokens):\n", 1)[1]
    row = next(line for line in final.splitlines() if line.startswith("val_loss/bible "))
    assert row.split()[1:] == [f"{loss_curve(1.0)(2048, 'bible'):.4f}", f"{loss_curve(0.9)(4096, 'bible'):.4f}"]
