"""Bad input through the real read stage and curation pipeline: every record is reported with its
location, counted, and accounted for (ids in = ids kept + ids removed + ids held out), and one bad
record never costs a good one."""

from __future__ import annotations

import codecs
import gzip
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokenmill import TokenmillError
from tokenmill.curate.normalize import Normalize
from tokenmill.curate.pipeline import run_pipeline
from tokenmill.documents.ingest import HeldoutConfig, ingest
from tokenmill.documents.readers import SourceConfig
from tokenmill.documents.shards import list_shards
from tokenmill.executors import LocalExecutor
from tokenmill.runfolder import RunFolder

from test_documents import deny_reading

SRC = Path(__file__).resolve().parents[1] / "src"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _docs(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"document {prefix}{i} says something worth reading. " * 20}
            for i in range(n)]


def _ids(folder: Path) -> list[str]:
    return [i for shard in list_shards(folder) for i in pq.read_table(shard, columns=["id"])["id"].to_pylist()]


def _rejected(folder: Path) -> pa.Table:
    shards = list_shards(folder / "rejected")
    return pa.concat_tables([pq.read_table(s) for s in shards]) if shards else pa.table({"id": [], "reason": []})


def _read(tmp_path: Path, pattern: str, steps=(), **source) -> dict:
    """Run the read stage (20% held out) and then ``steps``; return what went where."""
    run = RunFolder(tmp_path / "run")
    summary = ingest([SourceConfig(path=pattern, **source)], run.read.root, run.heldout,
                     HeldoutConfig(fraction=0.2, max_docs_per_domain=None), shard_docs=7, progress=False)
    removed = {"read": _rejected(run.read.root)}
    last = run.read
    if steps:
        with LocalExecutor(workers=1, progress=False) as ex:
            last, _ = run_pipeline(list(steps), run.read.documents, run, ex)
        for step in run.steps()[1:]:
            removed[step.name.split("-", 1)[1]] = _rejected(step.root)
    return {"summary": summary, "kept": _ids(last.documents), "removed": removed,
            "heldout": pq.read_table(run.heldout)["id"].to_pylist()}


def _assert_accounted(result: dict, ids_in: list[str]) -> None:
    """Every input id ends up kept, removed (by exactly one stage) or held out, as often as it came in."""
    removed = [i for table in result["removed"].values() for i in table["id"].to_pylist()]
    assert Counter(result["kept"]) + Counter(removed) + Counter(result["heldout"]) == Counter(ids_in)
    summary = result["summary"]
    assert summary.input_docs == summary.kept_docs + summary.removed_docs + len(result["heldout"])


def _reasons(table: pa.Table) -> dict[str, str]:
    return dict(zip(table["id"].to_pylist(), table["reason"].to_pylist()))


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_truncated_compressed_file_is_reported_and_the_run_goes_on(tmp_path, suffix, compress):
    docs = _docs("cut", 300)
    blob = compress(_jsonl(docs))
    (tmp_path / f"a{suffix}").write_bytes(blob[: len(blob) // 2])
    (tmp_path / f"b{suffix}").write_bytes(compress(_jsonl(_docs("whole", 10))))  # read after the cut file
    result = _read(tmp_path, str(tmp_path / f"*{suffix}"))

    rejected = result["removed"]["read"]
    assert result["summary"].removed == {"truncated_file": 1}
    (location,) = rejected["source"].to_pylist()
    read_ok = len(result["kept"]) + len(result["heldout"]) - 10
    assert location == f"{tmp_path / ('a' + suffix)}:{read_ok + 1}"  # the line where the file broke
    assert 0 < read_ok < 300
    assert set(result["kept"]) | set(result["heldout"]) == {d["id"] for d in docs[:read_ok]} | {
        f"whole{i}" for i in range(10)}
    _assert_accounted(result, [d["id"] for d in docs[:read_ok]] + [f"whole{i}" for i in range(10)] + [location])


@pytest.mark.parametrize("name,reason", [
    ("a.jsonl.zst", "undecodable_file"),  # plain JSONL under a .zst name
    ("a.jsonl.gz", "undecodable_file"),  # plain JSONL under a .gz name
    ("a.jsonl", "unreadable_file"),  # no read permission
])
def test_unreadable_file_is_an_error_or_a_counted_skip_never_a_truncation(tmp_path, monkeypatch, name, reason):
    src = tmp_path / "in"
    src.mkdir()
    (src / name).write_bytes(_jsonl(_docs("lost", 20)))
    docs = _docs("read", 20)
    (src / "b.jsonl").write_bytes(_jsonl(docs))
    if reason == "unreadable_file":
        deny_reading(monkeypatch, src / name)
    what = "cannot be read" if reason == "unreadable_file" else "cannot be decoded"
    with pytest.raises(TokenmillError, match=rf"{re.escape(str(src / name))}.*{what}"):
        _read(tmp_path, str(src))

    result = _read(tmp_path, str(src), on_unreadable="skip")
    assert result["summary"].removed == {reason: 1}
    (location,) = result["removed"]["read"]["source"].to_pylist()
    assert location == f"{src / name}:1"
    assert sorted(result["kept"] + result["heldout"]) == sorted(d["id"] for d in docs)
    _assert_accounted(result, [d["id"] for d in docs] + [location])


def test_bom_does_not_cost_the_first_document(tmp_path):
    docs = _docs("bom", 10)
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + _jsonl(docs))
    result = _read(tmp_path, str(tmp_path / "bom.jsonl"))
    assert result["summary"].removed == {}
    assert sorted(result["kept"] + result["heldout"]) == sorted(d["id"] for d in docs)
    _assert_accounted(result, [d["id"] for d in docs])


def test_deeply_nested_line_is_one_rejection_and_the_rest_is_read(tmp_path):
    docs = _docs("deep", 10)
    path = tmp_path / "deep.jsonl"
    path.write_bytes(_jsonl(docs[:5]) + b"[" * 10_000 + b"\n" + _jsonl(docs[5:]))
    result = _read(tmp_path, str(path))
    assert _reasons(result["removed"]["read"]) == {f"{path}:6": "json_too_deep"}
    assert result["summary"].removed == {"json_too_deep": 1}
    assert sorted(result["kept"] + result["heldout"]) == sorted(d["id"] for d in docs)
    _assert_accounted(result, [d["id"] for d in docs] + [f"{path}:6"])
    assert not (tmp_path / "run" / "read.tmp").exists()


def test_mixed_valid_and_invalid_lines_lose_no_valid_document(tmp_path):
    good = _docs("ok", 12)
    path = tmp_path / "mixed.jsonl"
    lines = [
        _jsonl(good[:3]),
        b'{"id": "broken", "text": \n',  # line 4: malformed JSON
        b'{"id": "latin", "text": "caf\xe9"}\n',  # 5: not UTF-8
        b"[1, 2]\n",  # 6: not an object
        _jsonl([{"id": "notext"}, {"id": "number", "text": 3.5}]),  # 7, 8
        b"\n",  # 9: blank line, skipped
        _jsonl(good[3:9]),  # 10-15
        _jsonl([good[0]]),  # 16: duplicate id
        _jsonl(good[9:]),  # 17-19
    ]
    path.write_bytes(b"".join(lines))
    result = _read(tmp_path, str(path), steps=[Normalize()])

    read_rejects = result["removed"]["read"]
    assert _reasons(read_rejects) == {
        f"{path}:4": "malformed_json", f"{path}:5": "invalid_utf8", f"{path}:6": "not_an_object",
        "notext": "missing_text", "number": "text_not_a_string", "ok0": "duplicate_id",
    }
    assert dict(zip(read_rejects["id"].to_pylist(), read_rejects["source"].to_pylist()))["ok0"] == f"{path}:16"
    assert sorted(result["kept"] + result["heldout"]) == sorted(d["id"] for d in good)
    ids_in = [d["id"] for d in good] + ["ok0", f"{path}:4", f"{path}:5", f"{path}:6", "notext", "number"]
    _assert_accounted(result, ids_in)


def test_whitespace_and_control_character_documents_are_removed_with_a_reason(tmp_path):
    good = _docs("ok", 5)
    blank = [{"id": f"ws{i}", "text": t} for i, t in enumerate([" ", "\n\n\t  \r\n", "\u3000\u2003 \u00a0"])]
    control = [{"id": f"cc{i}", "text": t} for i, t in enumerate(["\x00\x01\x02", "\x7f\x1b\x08 \x00", "\x85\x9f"])]
    mixed = {"id": "mixed", "text": "real\x00 text\x07 between controls"}
    (tmp_path / "odd.jsonl").write_bytes(_jsonl(good[:2] + blank + control + [mixed] + good[2:]))
    result = _read(tmp_path, str(tmp_path / "odd.jsonl"), steps=[Normalize()])

    assert _reasons(result["removed"]["read"]) == {d["id"]: "empty_text" for d in blank}
    assert _reasons(result["removed"]["normalize"]) == {d["id"]: "empty" for d in control}
    assert sorted(result["kept"] + result["heldout"]) == sorted([d["id"] for d in good] + ["mixed"])
    _assert_accounted(result, [d["id"] for d in good + blank + control + [mixed]])


_BIG_DOC_RUN = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from tokenmill.curate.length import LengthFilter
    from tokenmill.curate.normalize import Normalize
    from tokenmill.curate.pipeline import run_pipeline
    from tokenmill.documents.ingest import HeldoutConfig, ingest
    from tokenmill.documents.readers import SourceConfig
    from tokenmill.executors import LocalExecutor
    from tokenmill.runfolder import RunFolder

    src, run = Path(sys.argv[1]), Path(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    folder = RunFolder(run)
    ingest([SourceConfig(path=str(src))], folder.read.root, folder.heldout, HeldoutConfig(fraction=0.0),
           progress=False)
    with LocalExecutor(workers=1, progress=False) as ex:
        _, stats = run_pipeline([Normalize(), LengthFilter(max_chars=1_000_000)], folder.read.documents, folder, ex)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (peak - before) * 1024, "removed": stats[-1].removed}))
""")


def _big_doc_run(tmp_path: Path, text: str) -> dict:
    src = tmp_path / "in" / "big.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(_jsonl([{"id": "small", "text": "a short document"}, {"id": "big", "text": text}]))
    out = subprocess.run([sys.executable, "-c", _BIG_DOC_RUN, str(src), str(tmp_path / "run")], check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": ""})
    return json.loads(out.stdout)


def test_fifty_megabyte_single_line_document_is_removed_in_bounded_memory(tmp_path):
    size = 50 << 20
    big = _big_doc_run(tmp_path / "big", "word " * (size // 5))
    small = _big_doc_run(tmp_path / "small", "word " * 1000)  # the same run without the big document
    assert big["removed"] == {"too_long_chars": 1} and small["removed"] == {}
    # About 7× today: the JSONL reader holds the line's bytes, its str and the parsed text (3×), then one
    # Arrow copy, and Parquet's writer buffers the page, its compressed form and min/max statistics.
    assert big["growth_bytes"] - small["growth_bytes"] < 8 * size
