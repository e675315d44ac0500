"""The run report and the comparison page, rendered by a real browser (headless Chromium).

Checks what a reader would see: the page renders (a non-blank screenshot, every section in the DOM)
and the browser reports no console or loading error. Needs Debian's chromium (`apt-get install -y
chromium`); skipped where it is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenmill.evaluate.compare import compare_runs
from tokenmill.report.compare_report import write_compare
from tokenmill.report.run_report import write_report

from test_compare import fake_run, loss_curve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]
PAGE_ERRORS = ("Uncaught", "ERROR:CONSOLE", ":CONSOLE(", "net::ERR_", "Not allowed to load")


def render(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    return subprocess.run([CHROMIUM, *FLAGS, profile, *extra, page.resolve().as_uri()], capture_output=True,
                          text=True, timeout=120)


def assert_renders(page: Path, tmp_path: Path, sections: list[str]) -> None:
    shot = tmp_path / f"{page.stem}.png"
    proc = render(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and plots, not a blank page
    errors = [line for line in proc.stderr.splitlines() if any(e in line for e in PAGE_ERRORS)]
    assert not errors, errors

    dom = render(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in sections:
        assert f'<section id="{name}">' in dom.stdout
    assert dom.stdout.count("<img") == page.read_text(encoding="utf-8").count("<img")


def test_run_report_renders(tmp_path):
    run = fake_run(tmp_path / "run", evals=[512, 1024, 2048], harness_acc=0.5)
    (run / "eval" / "membership.json").write_text(json.dumps({
        "methods": {m: {"auc": 0.6, "tpr_at_5fpr": 0.1} for m in ("min_k_prob", "perplexity", "zlib")},
        "members": 8, "nonmembers": 8, "k": 0.2, "max_tokens": 64,
        "source": {"auto": {"per_domain": {"bible": 4, "code": 4}, "seed": 0, "epochs_seen": 1.5}}}))
    assert_renders(write_report(run), tmp_path,
                   ["recipe", "timings", "curation", "tokens", "training", "evaluation", "model"])


def test_compare_page_renders(tmp_path):
    runs = [fake_run(tmp_path / "a", evals=[512, 1024, 2048], harness_acc=0.4),
            fake_run(tmp_path / "b", evals=[768, 1536, 3072], curve=loss_curve(0.9), fingerprint="tok-b",
                     select_cost={"flops": 1e8, "seconds": 2.0}, harness_acc=0.5)]
    assert_renders(write_compare(compare_runs(runs), tmp_path / "cmp"), tmp_path, ["runs", "results", "plots"])
