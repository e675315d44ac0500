"""benchmarks/gpu_suite.sh --smoke: every step runs on CPU and stdout is nothing but JSON figure lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_prints_one_json_line_per_figure():
    env = {**os.environ, "PYTHON": sys.executable}  # the suite's python is this test's interpreter
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line, none skipped: all JSON
    assert lines and all(isinstance(line, dict) and "figure" in line for line in lines)
    assert not [line for line in lines if "error" in line]
    by_figure = {}
    for line in lines:
        by_figure.setdefault(line["figure"], []).append(line)

    (speed,) = by_figure["train_speed_124M"]
    assert speed["benchmark"] == "train_speed" and speed["results"]["tokenmill"]["tokens_per_s"] > 0
    assert "hf_llama" in speed["results"] and "litgpt" in speed["results"]  # measured, or noted as skipped
    (masked,) = by_figure["train_speed_124M_doc_mask"]
    assert masked["doc_mask"] and masked["results"]["tokenmill[doc_mask]"]["tokens_per_s"] > 0
    (ac,) = by_figure["train_speed_350M_ac"]
    assert set(ac["results"]) == {"tokenmill", "tokenmill[ac=selective]", "tokenmill[ac=full]"}

    memory = {line["optimizer"]: line for line in by_figure["memory"]}
    assert set(memory) == {"adamw", "muon", "galore", "galore_per_layer", "sltrain"}
    for name, line in memory.items():
        assert line["peak_kind"] == "cpu_peak_rss" and line["peak_bytes"] > 0, name
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):  # the loop's build, predicted exactly
            if name == "galore_per_layer" and key == "grad_bytes":  # none at rest; predicted: the largest one
                assert line["measured"][key] == 0 < line["predicted"][key]
                continue
            assert line["measured"][key] == line["predicted"][key], (name, key)
    assert memory["sltrain"]["measured"]["param_bytes"] < memory["adamw"]["measured"]["param_bytes"]

    assert by_figure["pytest_gpu"] == [{"figure": "pytest_gpu", "pytest_gpu": "skipped: no GPU"}]
    (suite,) = by_figure["suite"]
    assert suite["failed"] is False and lines[-1] is suite
