"""`tokenmill eval` on a tiny trained run: harness, membership (files and automatic), bits per byte."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tokenmill.cli import main
from tokenmill.evaluate.model_evals import auto_membership_texts
from tokenmill.runfolder import RunFolder

from conftest import DEMO_DATA

TINY = {
    "name": "tiny-eval",
    "sources": [{"path": str(DEMO_DATA / f"{d}.jsonl.gz"), "domain": d} for d in ("bible", "shakespeare")],
    "heldout": {"fraction": 0.05, "max_docs_per_domain": 4, "min_docs_per_domain": 2},
    "curate": {"shard_docs": 100, "workers": 1, "steps": [{"step": "length_filter", "min_words": 50}]},
    "tokenizer": {"vocab_size": 384},
    "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
    "train": {"seq_len": 64, "micro_batch_size": 4, "global_batch_tokens": 256, "max_steps": 8, "warmup_steps": 1,
              "eval_every": 8, "eval_windows_per_domain": 2, "ckpt_every": 8, "log_every": 4},
    "eval": {"max_docs_per_domain": 1, "batch_size": 32},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["run", str(tmp / "recipe.yaml"), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


def _curated_texts(run: Path) -> set[str]:
    final = json.loads((run / "curate" / "final.json").read_text())["documents"]
    return {t for p in (run / final).glob("shard-*.parquet") for t in pq.read_table(p).column("text").to_pylist()}


def test_harness_writes_results_prints_a_table_and_reaches_the_report(run, capsys):
    assert main(["eval", str(run), "--harness", "tokenmill_cloze", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "harness.json").read_text())
    assert list(result["results"]) == ["tokenmill_cloze"]
    assert result["n-samples"]["tokenmill_cloze"]["effective"] == 3
    assert result["options"] == {"tokenmill_cloze": {"task_dir": None, "backend": "tokenmill", "limit": 3,
                                                     "num_fewshot": None, "log_samples": False, "output_path": None}}
    acc = result["results"]["tokenmill_cloze"]["acc,none"]
    assert 0 <= acc <= 1
    assert "tokenmill_cloze" in out and "perplexity" in out and f"{acc:.4f}" in out
    page = (run / "report.html").read_text()
    assert "lm-evaluation-harness" in page and "tokenmill_cloze" in page
    assert "Not run: tokens" not in page  # the token section reads tokens/train/meta.json


def test_harness_runs_add_up_per_task_with_the_options_each_was_run_with(run, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    words = [{"context": "In the beginning God created the heaven and the", "target": " earth"},
             {"context": "And God said, Let there be", "target": " light"},
             {"context": "To be, or not to", "target": " be"}]
    (tasks / "words.jsonl").write_text("".join(json.dumps(w) + "\n" for w in words))
    (tasks / "words.yaml").write_text(
        "task: last_word\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: words.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: target\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    lm_eval_out = tmp_path / "lm_eval"
    assert main(["eval", str(run), "--harness", "tokenmill_cloze", "--limit", "3"]) == 0
    assert main(["eval", str(run), "--harness", "last_word", "--task-dir", str(tasks), "--limit", "2",
                 "--num_fewshot", "1", "--log_samples", "--output_path", str(lm_eval_out)]) == 0
    result = json.loads((run / "eval" / "harness.json").read_text())
    assert set(result["results"]) == set(result["options"]) == {"tokenmill_cloze", "last_word"}
    assert {task: n["effective"] for task, n in result["n-samples"].items()} == {"tokenmill_cloze": 3, "last_word": 2}
    assert result["n-shot"] == {"tokenmill_cloze": 0, "last_word": 1}
    assert result["options"]["last_word"] == {"task_dir": str(tasks), "backend": "tokenmill", "limit": 2,
                                              "num_fewshot": 1, "log_samples": True, "output_path": str(lm_eval_out)}
    samples = list(lm_eval_out.rglob("samples_last_word_*.jsonl"))
    assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 2
    assert "samples" not in result and len(list(lm_eval_out.rglob("results_*.json"))) == 1
    page = (run / "report.html").read_text()
    assert "tokenmill, 1-shot, first 2 items" in page and "tokenmill, 0-shot, first 3 items" in page

    assert main(["eval", str(run), "--harness", "tokenmill_cloze", "--limit", "4"]) == 0  # replaces cloze only
    again = json.loads((run / "eval" / "harness.json").read_text())
    assert again["n-samples"]["tokenmill_cloze"]["effective"] == 4 and again["options"]["tokenmill_cloze"]["limit"] == 4
    for key in ("results", "n-samples", "n-shot", "options", "versions", "higher_is_better"):
        assert again[key]["last_word"] == result[key]["last_word"]
    assert "last_word" in capsys.readouterr().out.rsplit("[tokenmill]", 1)[-1]  # the last table shows every kept task


def test_harness_options_and_missing_data_fail_in_one_line(run, tmp_path, monkeypatch, capsys):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    assert main(["eval", str(run), "--harness", "lambada_openai", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmill: error: run_harness: task 'lambada_openai': its data isn't available offline")
    assert err.count("\n") == 1
    assert main(["eval", str(run), "--harness", "tokenmill_cloze", "--log_samples"]) == 2
    assert "--log_samples needs --output_path" in capsys.readouterr().err
    assert main(["eval", str(run), "--harness", "tokenmill_cloze", "--num_fewshot", "-1"]) == 2
    assert "--num_fewshot must be 0 or more" in capsys.readouterr().err


def test_membership_auto_matches_domains_and_writes_scores(run, capsys):
    members, nonmembers, source = auto_membership_texts(run, 5)
    assert len(members) == len(nonmembers) == sum(source["auto"]["per_domain"].values()) == 5
    assert set(source["auto"]["per_domain"]) == {"bible", "shakespeare"}
    heldout = set(pq.read_table(run / "heldout" / "documents.parquet").column("text").to_pylist())
    assert set(members) <= _curated_texts(run) - heldout and set(nonmembers) <= heldout
    assert source["auto"]["epochs_seen"] > 0
    assert auto_membership_texts(run, 5)[0] == members  # seeded: the same draw every time

    assert main(["eval", str(run), "--membership-auto", "5"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "membership.json").read_text())
    assert result["members"] == result["nonmembers"] == 5
    assert set(result["methods"]) == {"min_k_prob", "perplexity", "zlib"}
    for method, scores in result["methods"].items():
        assert 0 <= scores["auc"] <= 1 and 0 <= scores["tpr_at_5fpr"] <= 1
        assert method in out and f"{scores['auc']:.4f}" in out
    assert result["max_tokens"] == TINY["model"]["max_seq_len"]  # capped at the model's context
    assert "Membership inference" in (run / "report.html").read_text()


def test_membership_from_files_reads_the_named_field(run, tmp_path, capsys):
    def write(name: str, texts: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
        return path

    members, nonmembers, _ = auto_membership_texts(run, 4, seed=1)
    args = ["eval", str(run), "--membership", str(write("in.jsonl", members)), str(write("out.jsonl", nonmembers))]
    assert main([*args, "--text-field", "body"]) == 0
    result = json.loads((run / "eval" / "membership.json").read_text())
    assert result["source"] == {"members": str(tmp_path / "in.jsonl"), "nonmembers": str(tmp_path / "out.jsonl")}
    assert result["members"] == result["nonmembers"] == 4
    capsys.readouterr()
    assert main(args) == 2  # the default field "text" is absent
    assert f"{tmp_path / 'in.jsonl'}:1: no non-empty string field 'text'" in capsys.readouterr().err


def test_bpb_from_the_export_matches_the_run(run, capsys):
    before = json.loads((run / "eval" / "bpb.json").read_text())
    (run / "eval" / "bpb.json").unlink()
    assert main(["eval", str(run), "--bpb"]) == 0
    after = json.loads((run / "eval" / "bpb.json").read_text())
    out = capsys.readouterr().out
    assert after["macro_bpb"] == pytest.approx(before["macro_bpb"], rel=1e-4)
    for domain, stats in before["domains"].items():
        assert after["domains"][domain]["bytes"] == stats["bytes"]
        assert f"{after['domains'][domain]['bpb']:.4f}" in out


def test_errors_name_the_problem(tmp_path, capsys):
    RunFolder(tmp_path).stamp()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["eval", str(tmp_path), "--harness"]) == 2
    assert "run folder without a model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--membership-auto", "0"])
    assert "positive integer" in capsys.readouterr().err
