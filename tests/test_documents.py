"""Readers and the read stage: every format, every kind of bad input counted with its location."""

from __future__ import annotations

import builtins
import codecs
import errno
import gzip
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokenmill import TokenmillError
from tokenmill.documents.ingest import HeldoutConfig, choose_heldout, ingest
from tokenmill.documents.readers import ReadStats, SourceConfig, read_source
from tokenmill.documents.shards import list_shards

from conftest import demo_docs


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _read(path, **kw):
    stats = ReadStats()
    recs = list(read_source(SourceConfig(path=str(path), **kw), stats))
    return recs, stats


ROWS = [{"id": f"d{i}", "text": f"document number {i} " * 5} for i in range(5)]


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl", lambda b: b),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_plain_and_compressed(tmp_path, suffix, compress):
    path = tmp_path / f"web{suffix}"
    path.write_bytes(compress(_jsonl(ROWS)))
    recs, stats = _read(path)
    assert [r.id for r in recs] == [r["id"] for r in ROWS]
    assert [r.text for r in recs] == [r["text"] for r in ROWS]
    assert {r.domain for r in recs} == {"web"}  # default domain: file name without extensions
    assert stats.rejected == {}


def test_parquet_and_txt_directory_and_glob(tmp_path):
    pq.write_table(pa.table({"content": ["a parquet document", "another one"], "lang": ["en", "fr"]}),
                   tmp_path / "p.parquet")
    recs, _ = _read(tmp_path / "p.parquet", text_field="content", domain="pq")
    assert [r.text for r in recs] == ["a parquet document", "another one"]
    assert json.loads(recs[1].meta) == {"lang": "fr"}
    assert recs[0].id.endswith("p.parquet:1")  # no id column: location is the id

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("first book")
    (tmp_path / "books" / "b.txt").write_text("second book")
    recs, _ = _read(tmp_path / "books")
    assert [r.text for r in recs] == ["first book", "second book"]
    assert {r.domain for r in recs} == {"books"}

    recs, _ = _read(tmp_path / "books" / "*.txt", domain="lit")
    assert len(recs) == 2 and {r.domain for r in recs} == {"lit"}


def test_bad_records_are_counted_with_location(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        _jsonl([{"id": "ok1", "text": "fine text"}])
        + b'{"id": "broken", "text": \n'  # malformed JSON
        + b'{"id": "latin", "text": "caf\xe9"}\n'  # not UTF-8
        + b'["a list"]\n'
        + _jsonl([{"id": "nt"}, {"id": "num", "text": 5}, {"id": "blank", "text": "  \n\t "},
                  {"id": "ok2", "text": "also fine"}]))
    recs, stats = _read(path)
    kept = [r.id for r in recs if not r.reason]
    assert kept == ["ok1", "ok2"]
    reasons = {r.reason: r.source for r in recs if r.reason}
    assert reasons == {
        "malformed_json": f"{path}:2", "invalid_utf8": f"{path}:3", "not_an_object": f"{path}:4",
        "missing_text": f"{path}:5", "text_not_a_string": f"{path}:6", "empty_text": f"{path}:7",
    }
    assert sum(stats.rejected.values()) == 6


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    rows = [{"id": f"d{i}", "text": "x" * 2000 + str(i)} for i in range(200)]
    blob = gzip.compress(_jsonl(rows))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    recs, stats = _read(path)
    good = [r for r in recs if not r.reason]
    assert 0 < len(good) < 200
    assert [r.id for r in good] == [f"d{i}" for i in range(len(good))]
    assert stats.rejected == {"truncated_file": 1}
    assert recs[-1].reason == "truncated_file" and recs[-1].source.startswith(str(path))


def test_bom_is_not_part_of_the_first_document(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + _jsonl(ROWS))
    recs, stats = _read(tmp_path / "bom.jsonl")
    assert [r.id for r in recs] == [r["id"] for r in ROWS] and stats.rejected == {}
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "bom.txt").write_bytes(codecs.BOM_UTF8 + "a book".encode())
    recs, stats = _read(tmp_path / "books")
    assert [r.text for r in recs] == ["a book"] and stats.rejected == {}


def test_json_nested_too_deep_is_one_rejected_line(tmp_path):
    def nested(doc_id: str, depth: int) -> bytes:  # depth counts the record's own object
        return f'{{"id": "{doc_id}", "text": "fine", "m": {"[" * (depth - 1)}{"]" * (depth - 1)}}}\n'.encode()

    path = tmp_path / "deep.jsonl"
    path.write_bytes(_jsonl(ROWS[:2]) + b"[" * 10_000 + b"\n" + nested("deepest kept", 500)
                     + nested("too deep", 501) + _jsonl(ROWS[2:]))
    recs, stats = _read(path)
    assert [r.id for r in recs if not r.reason] == ["d0", "d1", "deepest kept", "d2", "d3", "d4"]
    assert [(r.reason, r.source) for r in recs if r.reason] == [
        ("json_too_deep", f"{path}:3"), ("json_too_deep", f"{path}:5")]
    assert stats.rejected == {"json_too_deep": 2}


def test_json_number_too_long_for_python_is_one_rejected_line(tmp_path):
    path = tmp_path / "number.jsonl"
    path.write_bytes(_jsonl(ROWS[:2]) + b'{"id": "long", "text": "x", "n": ' + b"7" * 5000 + b"}\n"
                     + _jsonl(ROWS[2:]))
    recs, stats = _read(path)
    assert [r.id for r in recs if not r.reason] == [r["id"] for r in ROWS]
    assert [(r.reason, r.source) for r in recs if r.reason] == [("json_number_too_long", f"{path}:3")]


def deny_reading(monkeypatch, path) -> None:
    """Opening ``path`` fails as it does without read permission: tests run as root, whom chmod does not
    stop, so the refusal is made at ``open`` (the builtin, and ``io.open`` that pathlib calls)."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.txt", "a.html", "a.warc.gz"])
def test_unreadable_file_is_an_error_naming_it_or_a_counted_skip(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"")
    deny_reading(monkeypatch, path)
    with pytest.raises(TokenmillError, match=rf"{re.escape(str(path))}.*cannot be read.*Permission denied"):
        _read(path)
    recs, stats = _read(path, on_unreadable="skip")
    assert stats.rejected == {"unreadable_file": 1}
    assert [r.reason for r in recs] == ["unreadable_file"] and recs[0].source.startswith(str(path))


@pytest.mark.parametrize("name", ["plain.jsonl.zst", "plain.jsonl.gz", "plain.parquet", "plain.warc.gz",
                                  "plain.warc.zst"])
def test_undecodable_file_is_an_error_naming_it_or_a_counted_skip(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_jsonl(ROWS))  # plain JSONL under the name of a compressed or binary format
    with pytest.raises(TokenmillError, match=rf"{re.escape(str(path))}.*cannot be decoded"):
        _read(path)
    recs, stats = _read(path, on_unreadable="skip")
    assert stats.rejected == {"undecodable_file": 1}
    assert [r.reason for r in recs] == ["undecodable_file"] and recs[0].source.startswith(str(path))


def test_corrupt_gzip_keeps_the_documents_before_the_damage_when_skipped(tmp_path):
    rows = [{"id": f"d{i}", "text": f"text {i} " * 50} for i in range(100)]
    blob = bytearray(gzip.compress(_jsonl(rows)))
    blob[-6] ^= 0xFF  # the trailer's checksum: every line decompresses, the file does not check out
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(TokenmillError, match="cannot be decoded.*CRC"):
        _read(path)
    recs, stats = _read(path, on_unreadable="skip")
    assert [r.id for r in recs if not r.reason] == [r["id"] for r in rows]
    assert stats.rejected == {"undecodable_file": 1} and recs[-1].source == f"{path}:101"


def test_missing_path_and_unknown_format_are_clear_errors(tmp_path):
    with pytest.raises(TokenmillError, match="matches no file"):
        _read(tmp_path / "nope" / "*.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(TokenmillError, match="format"):
        _read(tmp_path / "x.csv")


def test_multi_megabyte_document_is_read_whole(tmp_path):
    big = "word " * 1_500_000  # 7.5 MB on one line
    path = tmp_path / "big.jsonl"
    path.write_bytes(_jsonl([{"id": "big", "text": big}]))
    recs, _ = _read(path)
    assert len(recs) == 1 and recs[0].text == big


def test_heldout_choice_is_stable_and_bounded():
    keys = [(f"doc{i}", "a" if i % 3 else "b") for i in range(300)]
    cfg = HeldoutConfig(fraction=0.1, max_docs_per_domain=15, min_docs_per_domain=1)
    held = choose_heldout(keys, cfg)
    assert held == choose_heldout(list(reversed(keys)), cfg)  # independent of order
    by_dom = {d: sum(1 for k, dd in keys if dd == d and k in held) for d in "ab"}
    assert by_dom == {"a": 15, "b": 10}  # a: 200 docs → 20 capped at 15; b: 100 → 10


def test_ingest_writes_shards_heldout_and_rejects(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = demo_docs("bible", 40)
    (src / "bible.jsonl").write_bytes(_jsonl(docs) + b"not json\n" + _jsonl([docs[0]]))
    out = tmp_path / "run" / "read"
    summary = ingest([SourceConfig(path=str(src / "*.jsonl"))], out, tmp_path / "run" / "heldout.parquet",
                     HeldoutConfig(fraction=0.1), shard_docs=10, progress=False)
    assert summary.input_docs == 42
    assert summary.removed == {"malformed_json": 1, "duplicate_id": 1}
    held = pq.read_table(tmp_path / "run" / "heldout.parquet")
    assert held.num_rows == 4
    shards = list_shards(out / "documents")
    assert len(shards) == 4  # 36 kept documents in shards of 10
    kept_ids = [i for s in shards for i in pq.read_table(s).column("id").to_pylist()]
    assert len(kept_ids) == 36 == summary.kept_docs
    assert set(kept_ids) | set(held.column("id").to_pylist()) == {d["id"] for d in docs}
    rejected = pq.read_table(list_shards(out / "rejected")[0])
    assert sorted(rejected.column("reason").to_pylist()) == ["duplicate_id", "malformed_json"]
    assert not (tmp_path / "run" / "read.tmp").exists()


def test_ingest_with_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(TokenmillError, match="no readable document"):
        ingest([SourceConfig(path=str(tmp_path / "e.jsonl"))], tmp_path / "read", tmp_path / "h.parquet",
               HeldoutConfig(), progress=False)
