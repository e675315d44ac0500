"""Read source files into core-schema documents, reporting every unreadable record with its location.

A reader never raises on bad *content*: a malformed JSON line, bytes that are not UTF-8, a record
without text, a truncated compressed file — each becomes a rejected record with a ``reason`` and a
``source`` of ``file:line`` so the user can find it, and reading goes on. It raises ``TokenmillError``
only for what the user must fix before anything can run: a path that matches nothing, an unknown format,
a Parquet file without the text column.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import TokenmillError

Format = Literal["auto", "jsonl", "parquet", "txt"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


class SourceConfig(BaseModel):
    """One input of a recipe: files of one format, optionally all labelled with one domain."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A file, a directory (read recursively) or a glob pattern "
                                  "(e.g. 'data/*.jsonl.gz'). Relative paths are relative to the recipe file.")
    format: Format = Field("auto", description="jsonl (also .gz/.zst), parquet, txt (one document per "
                                               "file), or auto: chosen from each file's extension.")
    text_field: str = Field("text", description="Field (JSON key or Parquet column) holding the text.")
    id_field: str | None = Field("id", description="Field holding a document id; when absent or missing "
                                                   "in a record, the id is '<file>:<line>'.")
    domain: str | None = Field(None, description="Domain label for every document of this source. "
                                                 "Default: the record's `domain_field`, else the file name "
                                                 "without extensions.")
    domain_field: str = Field("domain", description="Field holding a per-record domain label.")


@dataclass
class Record:
    """One document, or one rejected record when ``reason`` is set."""

    id: str
    text: str
    domain: str
    source: str
    meta: str = "{}"
    reason: str = ""


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def resolve_paths(pattern: str, base_dir: Path | None = None) -> list[Path]:
    """Expand a file, directory or glob into a sorted list of files; an empty match is an error."""
    raw = Path(os.path.expanduser(pattern))
    if not raw.is_absolute() and base_dir is not None:
        raw = base_dir / raw
    if raw.is_dir():
        files = sorted(p for p in raw.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif raw.is_file():
        files = [raw]
    else:
        files = sorted(Path(p) for p in glob.glob(str(raw), recursive=True) if Path(p).is_file())
    if not files:
        raise TokenmillError(f"source path {pattern!r} matches no file (looked for {raw})")
    return files


def detect_format(path: Path, fmt: Format) -> Format:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    raise TokenmillError(f"{path}: cannot tell the format from the extension; set `format:` on the source "
                         f"(jsonl, parquet or txt)")


def _default_domain(path: Path) -> str:
    return path.name.split(".")[0]


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_jsonl(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    line_no = 0
    where = str(path)
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                loc = f"{where}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(loc, raw.decode("utf-8", "backslashreplace"), "", loc,
                                 reason="invalid_utf8")
                    stats.reject("invalid_utf8")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    yield Record(loc, line, "", loc, reason="malformed_json")
                    stats.reject("malformed_json")
                    continue
                if not isinstance(obj, dict):
                    yield Record(loc, line, "", loc, reason="not_an_object")
                    stats.reject("not_an_object")
                    continue
                yield _record_from_fields(obj, path, loc, line, cfg, stats)
    except (EOFError, OSError, zstandard.ZstdError) as err:
        # A truncated or corrupt compressed file: keep what was read, report where it broke.
        loc = f"{where}:{line_no + 1}"
        stats.reject("truncated_file")
        yield Record(loc, f"{type(err).__name__}: {err}", "", loc, reason="truncated_file")


def _record_from_fields(obj: dict, path: Path, loc: str, raw: str, cfg: SourceConfig,
                        stats: ReadStats) -> Record:
    text = obj.get(cfg.text_field)
    rid = obj.get(cfg.id_field) if cfg.id_field else None
    doc_id = str(rid) if rid not in (None, "") else loc
    domain = cfg.domain or str(obj.get(cfg.domain_field) or _default_domain(path))
    if not isinstance(text, str):
        reason = "missing_text" if text is None else "text_not_a_string"
        stats.reject(reason)
        return Record(doc_id, raw if isinstance(raw, str) else json.dumps(obj), domain, loc, reason=reason)
    if not text.strip():
        stats.reject("empty_text")
        return Record(doc_id, text, domain, loc, reason="empty_text")
    extra = {k: v for k, v in obj.items() if k not in (cfg.text_field, cfg.id_field, cfg.domain_field)}
    meta = json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str) if extra else "{}"
    return Record(doc_id, text, domain, loc, meta)


def _read_parquet(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        stats.reject("unreadable_file")
        yield Record(str(path), str(err), "", str(path), reason="unreadable_file")
        return
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise TokenmillError(f"{path}: no column {cfg.text_field!r} (columns: {names}); "
                             f"set `text_field:` on the source")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield _record_from_fields(obj, path, f"{path}:{row}", json.dumps(obj, default=str), cfg, stats)


def _read_txt(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    raw = path.read_bytes()
    loc = str(path)
    domain = cfg.domain or _default_domain(path.parent)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.reject("invalid_utf8")
        yield Record(loc, raw.decode("utf-8", "backslashreplace"), domain, loc, reason="invalid_utf8")
        return
    if not text.strip():
        stats.reject("empty_text")
        yield Record(loc, text, domain, loc, reason="empty_text")
        return
    yield Record(loc, text, domain, loc)


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}


def read_source(cfg: SourceConfig, stats: ReadStats, base_dir: Path | None = None) -> Iterator[Record]:
    """Every record of every file of a source, in a stable order (sorted paths, file order)."""
    files = resolve_paths(cfg.path, base_dir)
    for path in files:
        fmt = detect_format(path, cfg.format)
        stats.files += 1
        for rec in _READERS[fmt](path, cfg, stats):
            stats.records += 1
            yield rec
