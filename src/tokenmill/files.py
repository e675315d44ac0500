"""Atomic JSON writes and strict JSON readers, shared by every layer that keeps state on disk.

A file written here is written to a temporary name and renamed into place, so a file that exists is
complete; a reader that finds broken JSON names the file and line instead of raising a bare traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenmill import TokenmillError


def write_json_atomic(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenmillError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); rerun the stage that wrote it") from None


def read_jsonl(path: Path) -> list[dict] | None:
    """The records of a JSON Lines file, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TokenmillError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete the line") from None
    return records
