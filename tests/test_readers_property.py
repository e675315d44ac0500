"""Property tests of the readers: whatever bytes, encodings, nesting or truncation come in, every input
record comes out kept, removed with a reason, or held out, and nothing raises but the TokenmillError
for a file that cannot be decoded."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import sys
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill import TokenmillError
from tokenmill.documents.readers import ReadStats, SourceConfig, read_source

from test_bad_input import _assert_accounted, _read

# Modest and without a database: the suite runs on a busy 2-core CI machine and leaves no files behind.
FAST = settings(max_examples=40, deadline=None, database=None)

LINE_REASONS = {"invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_a_string",
                "empty_text", "json_too_deep", "json_number_too_long"}
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32-be", "latin-1", "cp1252", "shift_jis"]
COMPRESS = {".gz": gzip.compress, ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}

# One JSONL line each: a document in some encoding, a document nesting its metadata some levels deep or
# with a number of many digits, a run of unclosed brackets, or arbitrary bytes (which may hold newlines).
ENTRIES = st.lists(st.one_of(
    st.tuples(st.just("doc"), st.text(max_size=30), st.sampled_from(ENCODINGS)),
    st.tuples(st.just("nested"), st.integers(2, 1200)),
    st.tuples(st.just("number"), st.integers(1, 6000)),
    st.tuples(st.just("open"), st.integers(1, 20_000)),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
), max_size=10)


def _render(entries: list[tuple], bom: bool) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The file's bytes, and what the reader must make of the lines whose fate is known: line number →
    (id, text) for a document kept, or ("", reason) for one rejected."""
    data, expected = bytearray(codecs.BOM_UTF8 if bom else b""), {}
    for k, entry in enumerate(entries):
        line_no = data.count(b"\n") + 1
        if entry[0] == "doc":
            _, text, encoding = entry
            data += json.dumps({"id": f"doc{k}", "text": text}, ensure_ascii=False).encode(encoding, "replace")
            if encoding.startswith("utf-8"):
                expected[line_no] = (f"doc{k}", text) if text.strip() else ("", "empty_text")
        elif entry[0] == "nested":  # the record's object, then depth - 1 arrays
            depth = entry[1]
            data += f'{{"id": "doc{k}", "text": "nested", "m": {"[" * (depth - 1)}{"]" * (depth - 1)}}}'.encode()
            expected[line_no] = (f"doc{k}", "nested") if depth <= 500 else ("", "json_too_deep")
        elif entry[0] == "number":
            digits = entry[1]
            data += f'{{"id": "doc{k}", "text": "number", "n": {"9" * digits}}}'.encode()
            expected[line_no] = (f"doc{k}", "number") if digits <= (sys.get_int_max_str_digits() or digits) else (
                "", "json_number_too_long")
        elif entry[0] == "open":
            data += b"[" * entry[1]
        else:
            data += entry[1]
        data += b"\n"
    return bytes(data), expected


def _nonblank_lines(data: bytes) -> list[int]:
    """Numbers of the lines a JSONL reader must account for: all but blank ones (a BOM is not content)."""
    return [n for n, line in enumerate(io.BytesIO(data), start=1) if line.removeprefix(codecs.BOM_UTF8).strip()]


def _read_all(path: Path, **source) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(read_source(SourceConfig(path=str(path), **source), stats)), stats


def _check_counts(recs: list, stats: ReadStats) -> None:
    rejected = [r.reason for r in recs if r.reason]
    assert sum(stats.rejected.values()) == len(rejected) and stats.records == len(recs)
    assert all(r.text.strip() for r in recs if not r.reason)


@FAST
@given(entries=ENTRIES, bom=st.booleans())
def test_every_jsonl_line_is_kept_or_rejected_with_its_reason(entries, bom):
    data, expected = _render(entries, bom)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.jsonl"
        path.write_bytes(data)
        recs, stats = _read_all(path)
    assert [r.source for r in recs] == [f"{path}:{n}" for n in _nonblank_lines(data)]
    assert {r.reason for r in recs if r.reason} <= LINE_REASONS
    _check_counts(recs, stats)
    by_line = {int(r.source.rsplit(":", 1)[1]): r for r in recs}
    for line_no, (doc_id, text_or_reason) in expected.items():
        rec = by_line[line_no]
        if doc_id:
            assert (rec.id, rec.text, rec.reason) == (doc_id, text_or_reason, "")
        else:
            assert rec.reason == text_or_reason


@FAST
@given(entries=ENTRIES, suffix=st.sampled_from(sorted(COMPRESS)), data=st.data())
def test_a_cut_compressed_file_keeps_every_line_before_the_cut(entries, suffix, data):
    plain, _ = _render(entries, bom=False)
    blob = COMPRESS[suffix](plain)
    cut = data.draw(st.integers(0, len(blob)), label="cut")
    with tempfile.TemporaryDirectory() as tmp:
        whole, cut_path = Path(tmp) / f"whole.jsonl{suffix}", Path(tmp) / f"cut.jsonl{suffix}"
        whole.write_bytes(blob)
        cut_path.write_bytes(blob[:cut])
        complete, _ = _read_all(whole)
        try:
            recs, stats = _read_all(cut_path)
        except TokenmillError:  # one byte of gzip's two-byte magic number does not say "gzip": undecodable
            assert (suffix, cut) == (".gz", 1)
            return
    _check_counts(recs, stats)
    if recs and recs[-1].reason == "truncated_file":
        recs = recs[:-1]
    elif 0 < cut < len(blob):
        pytest.fail(f"a file cut at byte {cut} of {len(blob)} was read as whole")
    assert [(r.id, r.text, r.reason) for r in recs] == [
        (r.id.replace("whole.", "cut."), r.text, r.reason) for r in complete[: len(recs)]]
    assert "truncated_file" not in {r.reason for r in recs}


@FAST
@given(entries=ENTRIES, suffix=st.sampled_from(sorted(COMPRESS)), noise=st.binary(min_size=1, max_size=8),
       data=st.data())
def test_a_damaged_or_foreign_compressed_file_is_an_error_or_a_counted_skip(entries, suffix, noise, data):
    plain, _ = _render(entries, bom=False)
    blob = bytearray(data.draw(st.sampled_from([plain, COMPRESS[suffix](plain)]), label="compressed?"))
    at = data.draw(st.integers(0, len(blob)), label="damage at")
    blob[at : at + len(noise)] = noise
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"damaged.jsonl{suffix}"
        path.write_bytes(bytes(blob))
        try:
            recs, stats = _read_all(path)
        except TokenmillError as err:
            assert str(err).startswith(f"{path}:") and "cannot be decoded" in str(err)
        else:
            assert {r.reason for r in recs} <= LINE_REASONS | {"", "truncated_file"}
        recs, stats = _read_all(path, on_unreadable="skip")
    _check_counts(recs, stats)
    file_failures = [i for i, r in enumerate(recs) if r.reason in ("truncated_file", "undecodable_file")]
    assert file_failures in ([], [len(recs) - 1])  # at most one, where reading stopped
    assert {r.reason for r in recs} <= LINE_REASONS | {"", "truncated_file", "undecodable_file"}


@FAST
@given(raw=st.binary(max_size=200), bom=st.booleans())
def test_a_txt_file_is_one_document_or_one_rejection_and_never_keeps_the_bom(raw, bom):
    data = (codecs.BOM_UTF8 if bom else b"") + raw
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "page.txt"
        path.write_bytes(data)
        (rec,), stats = _read_all(path)
    _check_counts([rec], stats)
    try:
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8")  # the first BOM marks the encoding
    except UnicodeDecodeError:
        assert rec.reason == "invalid_utf8"
        return
    assert (rec.text, rec.reason) == (text, "" if text.strip() else "empty_text")


@settings(max_examples=15, deadline=None, database=None)
@given(entries=ENTRIES, bom=st.booleans())
def test_the_read_stage_accounts_for_every_record(entries, bom):
    data, _ = _render(entries, bom)
    data += json.dumps({"id": "anchor", "text": "one document that is always readable"}).encode() + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.jsonl"
        path.write_bytes(data)
        ids_in = [r.id for r in _read_all(path)[0]]
        result = _read(Path(tmp), str(path))
    assert result["summary"].input_docs == len(_nonblank_lines(data))
    _assert_accounted(result, ids_in)
