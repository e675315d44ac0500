"""The data-efficiency benchmark, small: its demo scale on the bundled corpus, every setting, CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import DEMO_DATA

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "data_efficiency.py"


@pytest.mark.slow
def test_selection_beats_random_on_the_target_at_equal_tokens(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("data_efficiency", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    benchmark.main(["--scale", "demo", "--corpus", str(DEMO_DATA), "--methods", "random", "dsir", "color_filter",
                    "preselect", "--threads", "1", "--workdir", str(tmp_path)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(result["plot"]).stat().st_size > 0
    runs = len(benchmark.SCALES["demo"].run_fractions)

    in_pool, out_of_pool = result["settings"]["in_pool"]["methods"], result["settings"]["out_of_pool"]["methods"]
    random = in_pool["random"]
    assert random["token_ratio"] == {"complete_runs": 1.0, "within_run": 1.0}
    assert 0.2 < random["target_share"] < 0.5  # python_docs: about a third of the pool
    for method in ("dsir", "color_filter", "preselect"):
        selected = in_pool[method]
        assert len(selected["curve"]["complete_runs"]) == runs and len(selected["curve"]["within_run"]) == 10
        assert selected["curve"]["within_run"][-1] == selected["curve"]["complete_runs"][-1]  # the same run
        assert selected["target_share"] > 0.9, method  # the target's own documents, found in the pool
        assert selected["final_target_bpb"] < random["final_target_bpb"], method
        assert 0 < selected["token_ratio"]["complete_runs"] < 1, method
        assert selected["proxy_flops"] > 0 or method == "dsir"
    assert all(r["target_share"] == 0 for r in out_of_pool.values())  # the target's domain left the pool
    assert result["best_token_ratio_vs_random"]["in_pool"]["complete_runs"] == min(
        in_pool[m]["token_ratio"]["complete_runs"] for m in ("dsir", "color_filter", "preselect"))
