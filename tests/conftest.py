"""Shared fixtures: small real documents from the bundled demo corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "tokenmill" / "data" / "demo"


def demo_docs(domain: str, n: int | None = None) -> list[dict]:
    with gzip.open(DEMO_DATA / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return rows[:n] if n is not None else rows


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The test models are tiny: intra-op threads only add contention on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def demo_data_dir() -> Path:
    return DEMO_DATA
