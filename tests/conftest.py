"""Shared fixtures: small real documents from the bundled demo corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "tokenmill" / "data" / "demo"


def demo_docs(domain: str, n: int | None = None) -> list[dict]:
    with gzip.open(DEMO_DATA / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return rows[:n] if n is not None else rows


@pytest.fixture
def demo_data_dir() -> Path:
    return DEMO_DATA
