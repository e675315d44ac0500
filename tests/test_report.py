"""The HTML run report: every stage's figures appear, plots are inline, nothing reaches the network."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from tokenmill import TokenmillError
from tokenmill.report.run_report import write_report
from tokenmill.runfolder import RunFolder

RECIPE = "name: demo\nnotes: '<script>alert(1)</script>'\n"

READ = {"step": "read", "input_docs": 1200, "kept_docs": 1190, "removed_docs": 10, "input_bytes": 5_000_000,
        "kept_bytes": 4_990_000, "removed": {"malformed_json": 10}, "counters": {}, "seconds": 1.5}
STEPS = [
    {"step": "gopher", "input_docs": 1190, "kept_docs": 1001, "removed_docs": 189, "input_bytes": 4_990_000,
     "kept_bytes": 4_400_321, "removed": {"too_short": 120, "symbol_ratio": 69}, "counters": {}, "seconds": 2.0},
    {"step": "minhash", "input_docs": 1001, "kept_docs": 923, "removed_docs": 78, "input_bytes": 4_400_321,
     "kept_bytes": 4_100_777, "removed": {"near_duplicate": 78}, "counters": {"clusters": 31}, "seconds": 3.25},
]
TOKENS = {"n_tokens": 987_654, "vocab_size": 8192,
          "domains": {"bible": {"tokens": 600_000, "docs": 400}, "code": {"tokens": 387_654, "docs": 523}}}
BPB = {
    "domains": {"bible": {"bpb": 1.2345, "docs": 20, "bytes": 40_000, "tokens": 9_000, "nll_bits": 49_380.0},
                "code<x>": {"bpb": 0.8765, "docs": 30, "bytes": 60_000, "tokens": 15_000, "nll_bits": 52_590.0}},
    "overall": {"bpb": 1.0194, "docs": 50, "bytes": 100_000, "tokens": 24_000, "nll_bits": 101_970.0},
    "macro_bpb": 1.0555,
}


def make_run(root: Path) -> Path:
    RunFolder(root).stamp()
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "timings.json").write_text(json.dumps({"curate": 6.75, "tokenize": 2.5, "train": 40.0}))
    for stats, folder in [(READ, "read"), (STEPS[0], "01-gopher"), (STEPS[1], "02-minhash")]:
        (root / "curate" / folder).mkdir(parents=True)
        (root / "curate" / folder / "stats.json").write_text(json.dumps(stats))
    (root / "tokens" / "train").mkdir(parents=True)
    (root / "tokens" / "train" / "meta.json").write_text(json.dumps(TOKENS))
    (root / "train").mkdir()
    lines = [{"step": s, "tokens": 4096 * s, "loss": 9.0 - 0.05 * s, "tokens_per_s": 1000.0 + s,
              "mfu": 0.3 + s / 1000} for s in range(1, 60)]
    lines += [{"step": s, "tokens": 4096 * s, "val_loss": 8.5 - 0.04 * s, "val_loss/bible": 8.0 - 0.04 * s}
              for s in (20, 40, 59)]
    (root / "train" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "train" / "summary.json").write_text(json.dumps({"memory": {
        "param_bytes": 3 << 20, "grad_bytes": 3 << 20, "optimizer_state_bytes": 6 << 20, "peak_bytes": 512 << 20,
        "peak_kind": "cpu_peak_rss"}}))
    (root / "eval").mkdir()
    (root / "eval" / "bpb.json").write_text(json.dumps(BPB))
    (root / "model").mkdir()
    return root


def test_full_run_report_shows_every_stage(tmp_path):
    html = make_run(tmp_path).joinpath("report.html")
    assert write_report(tmp_path) == html
    page = html.read_text(encoding="utf-8")
    for stats in [READ, *STEPS]:
        for key in ("input_docs", "kept_docs", "removed_docs", "kept_bytes"):
            assert f"{stats[key]:,}" in page
        for reason, count in stats["removed"].items():
            assert re.search(rf"{reason}</td><td>{count:,}</td>", page)
    assert "clusters</td><td>31" in page
    for domain, stats in TOKENS["domains"].items():
        assert re.search(rf"{domain}</td><td>{stats['docs']:,}</td><td>{stats['tokens']:,}</td>", page)
    assert f"{BPB['domains']['bible']['bpb']:.4f}" in page and f"{BPB['overall']['bpb']:.4f}" in page
    assert f"{BPB['macro_bpb']:.4f}" in page
    assert page.index("code&lt;x&gt;") < page.index(">bible<", page.index('id="evaluation"'))  # lowest bpb first
    lines = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert f"{max(m['tokens'] for m in lines):,}" in page
    assert f"{statistics.median(m['tokens_per_s'] for m in lines if 'tokens_per_s' in m):,.0f}" in page
    assert f"{statistics.median(m['mfu'] for m in lines if 'mfu' in m):.4f}" in page
    assert str((tmp_path / "model").resolve()) in page
    assert page.count("data:image/png;base64,") == 3  # funnel, composition, loss curves
    assert "Not run" not in page


def test_report_is_self_contained_and_escaped(tmp_path):
    page = write_report(make_run(tmp_path)).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<details>" in page


def test_training_section_shows_where_memory_went(tmp_path):
    page = write_report(make_run(tmp_path)).read_text(encoding="utf-8")
    for figure in ("parameters (per device)</td><td>3.0 MiB", "optimizer state (per device)</td><td>6.0 MiB",
                   "peak memory (cpu peak rss)</td><td>512.0 MiB"):
        assert figure in page


def test_recipe_only_run_renders_with_sections_not_run(tmp_path):
    RunFolder(tmp_path).stamp()
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    for missing in ("timings.json", "curate/*/stats.json", "tokens/train/meta.json", "train/metrics.jsonl",
                    "eval/bpb.json", "model/"):
        assert f"Not run: {missing}" in page
    assert "data:image/png" not in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "report.html", "tokenmill.json"]  # no temp file left


def test_missing_recipe_and_bad_json_are_clear_errors(tmp_path):
    with pytest.raises(TokenmillError, match="recipe.yaml"):
        write_report(tmp_path)
    metrics = make_run(tmp_path) / "train" / "metrics.jsonl"
    bad_line = len(metrics.read_text().splitlines()) + 1
    with metrics.open("a") as f:
        f.write('{"tokens": 1, "loss"\n')
    with pytest.raises(TokenmillError, match=rf"metrics.jsonl:{bad_line}:"):
        write_report(tmp_path)


def test_mixture_section_plots_the_realised_mixture_and_doremi_weights(tmp_path):
    root = make_run(tmp_path)
    lines = [{"step": s, "tokens": 4096 * s, "loss": 5.0, "mix/bible": 0.25 if s < 40 else 0.75,
              "mix/code": 0.75 if s < 40 else 0.25} for s in (10, 20, 30, 40, 50)]
    lines += [{"step": s, "tokens": 4096 * s, "weight/bible": 0.5 + s / 200, "weight/code": 0.5 - s / 200}
              for s in range(1, 51)]
    (root / "train" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "train" / "summary.json").write_text(json.dumps({"doremi_mean_weights": {"bible": 0.63, "code": 0.37}}))
    page = write_report(root).read_text(encoding="utf-8")
    section = page[page.index('<section id="mixture">'):]
    section = section[:section.index("</section>")]
    assert "DoReMi mean weight" in section and section.count("data:image/png;base64") == 1
    assert "<td>bible</td><td>0.4500</td><td>0.6300</td>" in section  # (3 × 0.25 + 2 × 0.75) / 5
