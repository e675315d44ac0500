"""The package's imports point down the layers of shared/DESIGN.md, as pyproject.toml's
import-linter contract declares them."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_layers():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_steps_are_listed_not_registered_by_import_side_effects():
    code = ("import tokenmill.curate, tokenmill.select, tokenmill.curate.base as base; "
            "print(hasattr(base, 'STEPS'), hasattr(base, 'register_step'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
