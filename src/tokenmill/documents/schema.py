"""The core document schema every stage reads and writes.

A document is one row: ``id`` (unique, stable across stages), ``text``, ``domain`` (the label that
mixing and per-domain evaluation group by), ``source`` (file and line/record it came from, so any
document can be traced back) and ``meta`` (a JSON object as a string, for whatever the source carried).
Steps may append columns (a language, a score); they never drop the core ones.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import pyarrow as pa

CORE_FIELDS = ("id", "text", "domain", "source", "meta")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)

# A rejected document is a document plus why it was removed and by which step.
REJECT_FIELDS = ("reason", "step")


def make_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a core-schema table from dicts; ``meta`` may be a dict (serialised) or a JSON string."""
    cols: dict[str, list] = {name: [] for name in CORE_FIELDS}
    for row in rows:
        for name in CORE_FIELDS:
            value = row.get(name, "" if name != "meta" else "{}")
            if name == "meta" and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False, sort_keys=True)
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def put_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Replace column ``name`` keeping its field (type, non-null), or append it if the table lacks it.

    Steps that rewrite the text or (re)score documents go through here, so the core schema survives
    every step unchanged.
    """
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, values)
    return table.set_column(index, table.schema.field(index), values)


def with_reason(table: pa.Table, reason: str | list[str], step: str) -> pa.Table:
    """Attach ``reason`` and ``step`` columns to removed documents (a single reason or one per row)."""
    n = table.num_rows
    reasons = [reason] * n if isinstance(reason, str) else list(reason)
    if len(reasons) != n:
        raise ValueError(f"{len(reasons)} reasons for {n} rejected rows")
    table = table.append_column("reason", pa.array(reasons, pa.string()))
    return table.append_column("step", pa.array([step] * n, pa.string()))
