"""Parquet shards of documents: atomic writes, stable names, and size-bounded batching.

Every file is written to a temporary name and renamed into place, so a shard that exists is complete;
a killed run leaves at most a ``*.tmp`` file, which the next run overwrites.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def list_shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.parquet"))


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # No min/max statistics on the text: for a multi-MB document they are another copy of it, and
    # nothing filters shards by text range.
    stats_columns = [name for name in table.column_names if name != "text"]
    pq.write_table(table, tmp, compression="zstd", write_statistics=stats_columns)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_shard(path: Path) -> pa.Table:
    return pq.read_table(path)


def text_bytes(table: pa.Table) -> int:
    """UTF-8 bytes of the ``text`` column (the unit every funnel and bits-per-byte figure uses)."""
    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.binary_length(table.column("text"))).as_py())


class ShardBuffer:
    """Collects rows and flushes a table through ``flush`` whenever a doc or byte bound is reached."""

    def __init__(self, flush: Callable[[list[dict]], None], max_docs: int, max_bytes: int):
        self._flush, self.max_docs, self.max_bytes = flush, max_docs, max_bytes
        self.rows: list[dict] = []
        self.bytes = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.bytes += len(row["text"])  # characters: a cheap bound; exact bytes are counted later
        if len(self.rows) >= self.max_docs or self.bytes >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
            self.rows, self.bytes = [], 0
