"""`tokenmill eval` on a tiny trained run: harness, membership (files and automatic), bits per byte."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tokenmill.cli import main
from tokenmill.evaluate.model_evals import auto_membership_texts

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
    assert result["options"] == {"tasks": ["tokenmill_cloze"], "task_dir": None, "backend": "tokenmill", "limit": 3}
    acc = result["results"]["tokenmill_cloze"]["acc,none"]
    assert 0 <= acc <= 1
    assert "tokenmill_cloze" in out and "perplexity" in out and f"{acc:.4f}" in out
    page = (run / "report.html").read_text()
    assert "lm-evaluation-harness" in page and "tokenmill_cloze" in page
    assert "Not run: tokens" not in page  # the token section reads tokens/train/meta.json


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
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["eval", str(tmp_path), "--harness"]) == 2
    assert "run folder without a model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--membership-auto", "0"])
    assert "positive integer" in capsys.readouterr().err
