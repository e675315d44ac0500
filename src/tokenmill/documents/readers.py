"""Read source files into core-schema documents, reporting every unreadable record with its location.

A reader never raises on bad *content*: a JSON line that is malformed or more than Python holds (too
deeply nested, too long a number), bytes that are not UTF-8, a record without text, a truncated
compressed file, a broken WARC record, a page in no decodable charset — each becomes a rejected record
with a ``reason`` and a ``source`` of ``file:line`` (``file:byte offset`` for WARC) so the user can find
it, and reading goes on. JSONL and WARC files are streamed, never loaded whole. A reader raises
``TokenmillError`` only for what the user must fix before anything can run: a path that matches
nothing, an unknown format, a Parquet file or dataset without the text column, and a file that cannot
be opened or decoded at all (unless the source says to skip such files): one rejected record would hide
a whole file's documents from the counts.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from fastwarc.warc import WarcRecord, WarcRecordType
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import TokenmillError
from tokenmill.documents.html_text import decode_html

Format = Literal["auto", "jsonl", "parquet", "txt", "html", "warc", "hf_disk"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_WARC_SUFFIXES = (".warc", ".warc.gz", ".warc.zst")
_HTML_SUFFIXES = (".html", ".htm")
_HF_DISK_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes at a dataset's root
_WARC_VERSION = b"WARC/1."
_HTML_TYPES = ("text/html", "application/xhtml+xml")
# Deeper JSON is rejected: far enough below Python's recursion limit (1000) that parsing a line and
# serialising its metadata never hit it, whatever the caller's stack depth, so both read passes agree.
_MAX_JSON_DEPTH = 500
_FILE_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError, pa.ArrowException)
_UNDECODABLE = (gzip.BadGzipFile, zlib.error, zstandard.ZstdError, pa.ArrowInvalid)
_FILE_FAILURES = {"unreadable_file": "cannot be read",
                  "undecodable_file": "cannot be decoded (is it the format its name says, and undamaged?)"}


class SourceConfig(BaseModel):
    """One input of a recipe: files of one format, optionally all labelled with one domain."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A file, a directory (read recursively) or a glob pattern "
                                  "(e.g. 'data/*.jsonl.gz'). Relative paths are relative to the recipe file.")
    format: Format = Field("auto", description="jsonl (also .gz/.zst), parquet, txt (one document per "
                                               "file), html (one page per .html/.htm file, raw HTML kept "
                                               "for the `extract` step), warc (.warc/.warc.gz/.warc.zst: one "
                                               "document per HTML response record), hf_disk (a Hugging Face "
                                               "dataset folder written by save_to_disk; `path` is that "
                                               "folder), or auto: chosen from each file's extension (a "
                                               "folder holding state.json or dataset_dict.json is hf_disk).")
    text_field: str = Field("text", description="Field (JSON key or Parquet column) holding the text.")
    id_field: str | None = Field("id", description="Field holding a document id; when absent or missing "
                                                   "in a record, the id is '<file>:<line>'.")
    domain: str | None = Field(None, description="Domain label for every document of this source. "
                                                 "Default: the record's `domain_field`, else the file name "
                                                 "without extensions.")
    domain_field: str = Field("domain", description="Field holding a per-record domain label.")
    on_unreadable: Literal["error", "skip"] = Field(
        "error", description="A file that cannot be opened or read (permissions, I/O error) or decoded (not "
                             "the compression its name says, corrupt data, not Parquet): `error` stops the "
                             "run naming the file; `skip` counts it as one rejected record (reason "
                             "`unreadable_file` or `undecodable_file`, keeping any documents read before "
                             "the damage) and reads on. A compressed file cut short is never an error: its "
                             "documents before the cut are kept and the cut is counted as `truncated_file`.")


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


def _expand(pattern: str, base_dir: Path | None) -> Path:
    raw = Path(os.path.expanduser(pattern))
    return base_dir / raw if not raw.is_absolute() and base_dir is not None else raw


def resolve_paths(pattern: str, base_dir: Path | None = None) -> list[Path]:
    """Expand a file, directory or glob into a sorted list of files; an empty match is an error."""
    raw = _expand(pattern, base_dir)
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
    if name.endswith(_HTML_SUFFIXES):
        return "html"
    if name.endswith(_WARC_SUFFIXES):
        return "warc"
    raise TokenmillError(f"{path}: cannot tell the format from the extension; set `format:` on the source "
                         f"(jsonl, parquet, txt, html, warc or hf_disk)")


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_DISK_MARKERS)


def _default_domain(path: Path) -> str:
    return path.name.split(".")[0]


_ZSTD_CHUNK = 1 << 20

class ZstdFile(io.RawIOBase):
    """A .zst stream that raises EOFError when the file ends inside a frame, as gzip does, where
    zstandard's stream_reader ends quietly: a cut file must be reported, not read as complete.
    Concatenated frames are read one after the other."""

    def __init__(self, path):
        self._raw = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            if self._frame.eof:  # the frame ended: what follows starts a new one, or the file is done
                data = self._frame.unused_data or self._raw.read(_ZSTD_CHUNK)
                if not data:
                    return 0
                self._frame = zstandard.ZstdDecompressor().decompressobj()
            elif not (data := self._raw.read(_ZSTD_CHUNK)):
                raise EOFError("the .zst file ends inside a frame: it was cut short")
            self._pending, self._offset = self._frame.decompress(data), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = memoryview(self._pending)[self._offset : self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdFile(path))
    return open(path, "rb")


def _file_failure(err: Exception, loc: str, cfg: SourceConfig, stats: ReadStats, domain: str = "") -> Record:
    """The rejection for a file that broke at ``loc``; raises instead for an unreadable or undecodable file
    unless the source skips those."""
    reason = "truncated_file" if isinstance(err, EOFError) else (
        "undecodable_file" if isinstance(err, _UNDECODABLE) else "unreadable_file")
    detail = f"{type(err).__name__}: {err}"
    if reason in _FILE_FAILURES and cfg.on_unreadable == "error":
        raise TokenmillError(f"{loc}: the file {_FILE_FAILURES[reason]} ({detail}); fix or remove it, or set "
                             f"`on_unreadable: skip` on the source to count it as rejected and read on")
    stats.reject(reason)
    return Record(loc, detail, domain, loc, reason=reason)


def _nested_too_deep(line: str, obj: object) -> bool:
    """Whether parsed JSON nests arrays and objects deeper than ``_MAX_JSON_DEPTH``; walked without
    recursion, and only for lines with enough brackets to be that deep."""
    if line.count("[") + line.count("{") <= _MAX_JSON_DEPTH:
        return False
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_JSON_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _read_jsonl(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    line_no = 0
    where = str(path)
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                loc = f"{where}:{line_no}"
                while raw.startswith(codecs.BOM_UTF8):  # starts the file, or a file concatenated to it
                    raw = raw[len(codecs.BOM_UTF8):]
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
                    reason = "json_too_deep" if _nested_too_deep(line, obj) else (
                        "" if isinstance(obj, dict) else "not_an_object")
                except json.JSONDecodeError:
                    reason = "malformed_json"
                except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
                    reason = "json_number_too_long"
                except RecursionError:
                    reason = "json_too_deep"
                if reason:
                    yield Record(loc, line, "", loc, reason=reason)
                    stats.reject(reason)
                    continue
                yield _record_from_fields(obj, path, loc, line, cfg, stats)
    except _FILE_ERRORS as err:
        # Cut short, undecodable or unreadable: what was read is kept, the record says where it broke.
        yield _file_failure(err, f"{where}:{line_no + 1}", cfg, stats)


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
    except _FILE_ERRORS as err:
        yield _file_failure(err, str(path), cfg, stats)
        return
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise TokenmillError(f"{path}: no column {cfg.text_field!r} (columns: {names}); "
                             f"set `text_field:` on the source")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield _record_from_fields(obj, path, f"{path}:{row}", json.dumps(obj, default=str), cfg, stats)
    except _FILE_ERRORS as err:  # a corrupt page: the rows before it are kept
        yield _file_failure(err, f"{path}:{row + 1}", cfg, stats)


def _read_bytes(path: Path, cfg: SourceConfig, stats: ReadStats, domain: str) -> bytes | Record:
    """A whole file's bytes, or the rejection of a file that cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        return _file_failure(err, str(path), cfg, stats, domain)


def _read_txt(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    loc = str(path)
    domain = cfg.domain or _default_domain(path.parent)
    raw = _read_bytes(path, cfg, stats, domain)
    if isinstance(raw, Record):
        yield raw
        return
    try:
        text = raw.decode("utf-8-sig")  # a BOM marks the encoding; it is not text
    except UnicodeDecodeError:
        stats.reject("invalid_utf8")
        yield Record(loc, raw.decode("utf-8", "backslashreplace"), domain, loc, reason="invalid_utf8")
        return
    if not text.strip():
        stats.reject("empty_text")
        yield Record(loc, text, domain, loc, reason="empty_text")
        return
    yield Record(loc, text, domain, loc)


def _read_html(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    loc = str(path)
    domain = cfg.domain or _default_domain(path.parent)
    raw = _read_bytes(path, cfg, stats, domain)
    if isinstance(raw, Record):
        yield raw
        return
    decoded = decode_html(raw)
    if decoded is None:
        stats.reject("undecodable_html")
        yield Record(loc, raw.decode("utf-8", "backslashreplace"), domain, loc, reason="undecodable_html")
        return
    text, encoding = decoded
    if not text.strip():
        stats.reject("empty_text")
        yield Record(loc, text, domain, loc, reason="empty_text")
        return
    yield Record(loc, text, domain, loc, json.dumps({"encoding": encoding}))


def _warc_records(fh: io.BufferedIOBase) -> Iterator[tuple[int, bytes | Exception, str]]:
    """Split a WARC stream into ``(offset, record bytes, "")``, or ``(offset, bytes read, reason)``
    for a stretch that is no well-formed record (``bad_warc_record``) or is cut short (``truncated_file``),
    or ``(offset, exception, "")`` where the stream itself breaks (cut short, undecodable or unreadable:
    ``_file_failure`` decides).

    We frame records ourselves (version line, header lines, ``Content-Length`` bytes of block) rather
    than let fastwarc iterate, because fastwarc either stops at the first broken record or skips it
    silently (and reads a truncated gzip member as an empty record); framing here reports a bad record
    at its exact offset and resumes at the next line that starts a record. Offsets count bytes of the
    uncompressed stream.
    """
    offset = 0
    try:
        line = fh.readline()
        while line:
            if not line.strip():  # blank lines separate records
                offset += len(line)
                line = fh.readline()
                continue
            start, head, length = offset, [line], None
            if line.startswith(_WARC_VERSION):
                while True:
                    offset += len(line)
                    line = fh.readline()
                    if not line.strip() or line.startswith(_WARC_VERSION):
                        break
                    head.append(line)
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value) if value.strip().isdigit() else None
                if not line:
                    yield offset, b"".join(head), "truncated_file"
                    return
            if length is None or line.startswith(_WARC_VERSION):  # unusable header: skip to the next record
                while line and not (line.startswith(_WARC_VERSION) and offset > start):
                    offset += len(line)
                    line = fh.readline()
                yield start, b"".join(head), "bad_warc_record"
                continue
            offset += len(line)
            block = fh.read(length)
            offset += len(block)
            if len(block) < length:
                yield offset, b"".join(head), "truncated_file"
                return
            yield start, b"".join(head) + line + block, ""
            line = fh.readline()
    except _FILE_ERRORS as err:  # a truncated, corrupt or unreadable stream
        yield offset, err, ""


def _html_document(raw: bytes, loc: str, domain: str, stats: ReadStats) -> Record | None:
    """The HTML page of one framed WARC record; None for records that carry no page (requests, images)."""
    try:
        record = WarcRecord.from_bytes(raw)
        if record.record_type != WarcRecordType.response:
            return None
        record.parse_http(auto_decode="all")
        if record.http_content_type not in _HTML_TYPES:
            return None
        body = record.reader.read()
    except OSError as err:  # fastwarc's signal for a malformed record or HTTP header
        stats.reject("bad_warc_record")
        return Record(loc, f"{err}: {_preview(raw)}", domain, loc, reason="bad_warc_record")
    doc_id = record.record_id or loc
    decoded = decode_html(body, record.http_charset)
    if decoded is None:
        stats.reject("undecodable_html")
        return Record(doc_id, _preview(body), domain, loc, reason="undecodable_html")
    text, encoding = decoded
    if not text.strip():
        stats.reject("empty_text")
        return Record(doc_id, text, domain, loc, reason="empty_text")
    meta = {"url": record.headers.get("WARC-Target-URI", ""), "date": record.headers.get("WARC-Date", ""),
            "encoding": encoding}
    return Record(doc_id, text, domain, loc, json.dumps(meta, ensure_ascii=False, sort_keys=True))


def _preview(raw: bytes) -> str:
    """The first bytes of a rejected record, readable whatever they are."""
    return raw[:1000].decode("utf-8", "backslashreplace")


def _read_warc(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    domain = cfg.domain or _default_domain(path)
    try:
        fh = _open_binary(path)
    except OSError as err:
        yield _file_failure(err, f"{path}:0", cfg, stats, domain)
        return
    with fh:
        for offset, raw, reason in _warc_records(fh):
            loc = f"{path}:{offset}"
            if isinstance(raw, Exception):
                yield _file_failure(raw, loc, cfg, stats, domain)
            elif reason:
                stats.reject(reason)
                yield Record(loc, _preview(raw), domain, loc, reason=reason)
            elif (doc := _html_document(raw, loc, domain, stats)) is not None:
                yield doc


def _read_hf_disk(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[Record]:
    """Rows of a dataset (every split of a DatasetDict, in saved order) written by ``save_to_disk``."""
    try:  # optional and slow to import: only sources that use it pay for it
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:
        raise TokenmillError(f"{path}: format hf_disk needs the `datasets` package ({err}); "
                             f"install it with `pip install 'tokenmill[hf]'`") from None
    try:
        loaded = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise TokenmillError(f"{path}: not a dataset folder written by save_to_disk ({err})") from None
    except (OSError, ValueError) as err:  # a damaged folder: truncated Arrow files, unreadable state.json
        raise TokenmillError(f"{path}: cannot read this save_to_disk folder ({type(err).__name__}: {err}); "
                             "write it again with Dataset.save_to_disk") from None
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        if cfg.text_field not in dataset.column_names:
            raise TokenmillError(f"{path} {split}: no column {cfg.text_field!r} (columns: "
                                 f"{dataset.column_names}); set `text_field:` on the source")
        where = f"{path}/{split}" if split else str(path)
        row = 0
        for batch in dataset.with_format("arrow").iter(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                raw = json.dumps(obj, default=str)
                yield _record_from_fields(obj, path, f"{where}:{row}", raw, cfg, stats)


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt, "html": _read_html,
            "warc": _read_warc}


def read_source(cfg: SourceConfig, stats: ReadStats, base_dir: Path | None = None) -> Iterator[Record]:
    """Every record of every file of a source, in a stable order (sorted paths, file order)."""
    for rec in _source_records(cfg, stats, base_dir):
        stats.records += 1
        yield rec


def _source_records(cfg: SourceConfig, stats: ReadStats, base_dir: Path | None) -> Iterator[Record]:
    root = _expand(cfg.path, base_dir)
    if cfg.format == "hf_disk" or (cfg.format == "auto" and _is_hf_dataset_dir(root)):
        stats.files += 1
        yield from _read_hf_disk(root, cfg, stats)
        return
    for path in resolve_paths(cfg.path, base_dir):
        fmt = detect_format(path, cfg.format)
        stats.files += 1
        yield from _READERS[fmt](path, cfg, stats)
