"""Web inputs and language identification: WARC, HTML in any charset, HF datasets, extract, langid."""

from __future__ import annotations

import gzip
import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.curate.extract import Extract
from tokenmill.curate.langid import Langid, identify
from tokenmill.documents.readers import ReadStats, SourceConfig, read_source
from tokenmill.documents.schema import make_table

ARTICLE = ("Bread needs flour, water, salt and yeast. Knead the dough for ten minutes until it is smooth "
           "and elastic, then leave it to rise in a warm place for an hour.")
PAGE = f"""<!DOCTYPE html><html><head><title>Baking</title></head><body>
<nav><ul><li><a href="/">Homepage</a></li><li><a href="/shop">Webshop</a></li>
<li><a href="/login">Login</a></li></ul></nav>
<main><article><h1>Baking bread at home</h1><p>{ARTICLE}</p>
<p>Bake the loaf in a hot oven for about forty minutes, until the crust is brown and sounds hollow.</p>
</article></main>
<footer><p>Copyright 2024 Examplecorp. All rights reserved. Privacy policy.</p></footer></body></html>"""


def _read(path, **kw):
    stats = ReadStats()
    return list(read_source(SourceConfig(path=str(path), **kw), stats)), stats


# ---- WARC ----------------------------------------------------------------------------------------

def _warc_record(url: str, body: bytes, *, warc_type: str = "response", content_type: str = "text/html",
                 content_length: str | None = None) -> tuple[bytes, str]:
    http = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)
    record_id = f"<urn:uuid:{uuid.uuid4()}>"
    head = (f"WARC/1.0\r\nWARC-Type: {warc_type}\r\nWARC-Record-ID: {record_id}\r\n"
            f"WARC-Date: 2024-05-06T07:08:09Z\r\nWARC-Target-URI: {url}\r\n"
            f"Content-Type: application/http; msgtype={warc_type}\r\n"
            f"Content-Length: {content_length or len(http)}\r\n\r\n")
    return head.encode() + http + b"\r\n\r\n", record_id


def _page(words: str, charset: str = "utf-8") -> bytes:
    return f"<html><body><p>{words}</p></body></html>".encode(charset)


@pytest.mark.parametrize("suffix", [".warc", ".warc.gz"])
def test_warc_reads_html_responses_and_reports_broken_records(tmp_path, suffix):
    good1, id1 = _warc_record("http://example.org/a", _page("first page"))
    request, _ = _warc_record("http://example.org/a", b"", warc_type="request")
    image, _ = _warc_record("http://example.org/logo.png", b"\x89PNG\r\n", content_type="image/png")
    bad_length, _ = _warc_record("http://example.org/b", _page("never read"), content_length="12x")
    garbage = b"this is not a WARC header\r\nnor is this\r\n\r\n"
    latin, id2 = _warc_record("http://example.org/c", _page("café déjà vu", "cp1252"),
                              content_type="text/html; charset=windows-1252")
    records = [good1, request, bad_length, image, garbage, latin]
    compress = gzip.compress if suffix.endswith(".gz") else (lambda b: b)
    path = tmp_path / f"crawl{suffix}"
    path.write_bytes(b"".join(compress(r) for r in records))

    recs, stats = _read(path)
    kept = [r for r in recs if not r.reason]
    assert [r.id for r in kept] == [id1, id2]
    assert "first page" in kept[0].text and "café déjà vu" in kept[1].text
    assert json.loads(kept[0].meta) == {"url": "http://example.org/a", "date": "2024-05-06T07:08:09Z",
                                        "encoding": "utf-8"}
    assert {r.domain for r in recs} == {"crawl"}

    plain = b"".join(records)
    offsets = [sum(map(len, records[:i])) for i in range(len(records))]
    assert [r.source for r in kept] == [f"{path}:{offsets[0]}", f"{path}:{offsets[5]}"]
    assert [(r.reason, r.source) for r in recs if r.reason] == [
        ("bad_warc_record", f"{path}:{offsets[2]}"), ("bad_warc_record", f"{path}:{offsets[4]}")]
    assert plain[offsets[4]:].startswith(b"this is not")
    assert stats.rejected == {"bad_warc_record": 2}


def test_truncated_warc_gz_keeps_complete_records(tmp_path):
    records = [_warc_record(f"http://example.org/{i}", _page(f"page {i} " + "text " * 400))
               for i in range(40)]
    blob = b"".join(gzip.compress(r) for r, _ in records)
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(blob[: len(blob) // 2])
    recs, stats = _read(path)
    good = [r for r in recs if not r.reason]
    assert 0 < len(good) < 40
    assert [r.id for r in good] == [rid for _, rid in records[: len(good)]]
    assert stats.rejected == {"truncated_file": 1}
    assert recs[-1].reason == "truncated_file" and recs[-1].source.startswith(f"{path}:")


# ---- HTML files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("charset,words", [
    ("shift_jis", "日本語のテキストです。こんにちは、世界。"),
    ("windows-1252", "Café, déjà vu – “naïve” façade"),
])
def test_html_file_in_declared_legacy_charset(tmp_path, charset, words):
    page = f'<html><head><meta charset="{charset}"><title>t</title></head><body><p>{words}</p></body></html>'
    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "page.html"
    path.write_bytes(page.encode(charset))
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    (rec,), stats = _read(path)
    assert not rec.reason and words in rec.text
    assert rec.domain == "site" and stats.rejected == {}


def test_mislabelled_and_undecodable_html(tmp_path):
    mislabelled = tmp_path / "utf8.htm"  # says Latin-1, is UTF-8: decoding as declared gives mojibake
    page = '<html><head><meta charset="iso-8859-1"></head><body>naïve ünïcode</body></html>'
    mislabelled.write_bytes(page.encode("utf-8"))
    binary = tmp_path / "binary.html"  # bytes undefined in UTF-8 and in windows-1252
    binary.write_bytes(b'<html><head><meta charset="utf-8"></head><body>' + bytes([0x81, 0x8d, 0x90]) * 20)
    recs, stats = _read(tmp_path)
    by_name = {r.id.rsplit("/", 1)[-1]: r for r in recs}
    assert "naïve ünïcode" in by_name["utf8.htm"].text and not by_name["utf8.htm"].reason
    assert by_name["binary.html"].reason == "undecodable_html"
    assert stats.rejected == {"undecodable_html": 1}


# ---- Hugging Face datasets saved to disk -------------------------------------------------------------

def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["first row", "second row", " "], "id": ["r1", "r2", "r3"], "lang": ["en", "en", "fr"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    recs, stats = _read(tmp_path / "ds")  # auto: a save_to_disk folder
    assert [r.id for r in recs if not r.reason] == ["r1", "r2"]
    assert json.loads(recs[0].meta) == {"lang": "en"}
    assert stats.rejected == {"empty_text": 1} and stats.files == 1

    splits = {"train": datasets.Dataset.from_dict({"body": ["a", "b"]}),
              "test": datasets.Dataset.from_dict({"body": ["c"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    recs, _ = _read(tmp_path / "dd", format="hf_disk", text_field="body", id_field=None, domain="hf")
    assert [r.text for r in recs] == ["a", "b", "c"]
    assert recs[2].id == f"{tmp_path / 'dd'}/test:1"
    with pytest.raises(TokenmillError, match="no column 'text'"):
        _read(tmp_path / "dd", format="hf_disk")


def test_a_damaged_hf_disk_folder_is_a_clear_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a row"] * 50}).save_to_disk(str(tmp_path / "ds"))
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated, as an interrupted copy leaves it
    with pytest.raises(TokenmillError, match="cannot read this save_to_disk folder"):
        _read(tmp_path / "ds")


# ---- extract -----------------------------------------------------------------------------------------

def _table(texts: list[str]) -> pa.Table:
    return make_table({"id": f"d{i}", "text": text, "domain": "web", "source": f"s:{i}"}
                      for i, text in enumerate(texts))


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_extract_keeps_body_drops_boilerplate(extractor):
    if extractor == "trafilatura":
        pytest.importorskip("trafilatura")
    empty_page = "<!doctype html><html><body><script>var x = 1;</script></body></html>"
    plain = "Plain text <b>with a tag</b> is not a page."
    result = Extract(extractor=extractor).process(_table([PAGE, plain, empty_page]))
    page_text, kept_plain = result.kept.column("text").to_pylist()
    assert ARTICLE in page_text and "Baking bread at home" in page_text
    for boilerplate in ("Homepage", "Webshop", "Examplecorp", "<p>"):
        assert boilerplate not in page_text
    assert kept_plain == plain
    assert result.removed.column("id").to_pylist() == ["d2"]
    assert result.removed.column("reason").to_pylist() == ["extract_empty"]
    assert result.removed.column("text").to_pylist() == [empty_page]  # the raw page, for inspection
    assert result.counters == {"html_extracted": 2}


def test_extract_everything_when_not_sniffing():
    fragment = "<p>Just a <em>fragment</em> of markup.</p>"
    assert Extract().process(_table([fragment])).kept.column("text").to_pylist() == [fragment]
    extracted = Extract(only_if_html=False).process(_table([fragment])).kept.column("text").to_pylist()
    assert extracted == ["Just a fragment of markup."]


# ---- langid ------------------------------------------------------------------------------------------

SAMPLES = {
    "en": "The quick brown fox jumps over the lazy dog while the farmer watches from the window.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zuschaut.",
    "zh": "敏捷的棕色狐狸跳过了懒惰的狗，农夫正从窗户里看着这一切。",
}


def test_identify_matches_py3langid_on_short_texts():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    texts = list(SAMPLES.values()) + ["ALL CAPS SHOUTING IS STILL ENGLISH TEXT FOR THE MODEL", "", "1234 !!"]
    language, score = identify(pa.array(texts, pa.large_string()))
    assert list(language[:4]) == list(SAMPLES)
    expected = [reference.classify(t) for t in texts[:5]]
    assert list(language[:5]) == [lang for lang, _ in expected]
    np.testing.assert_allclose(score[:5], [s for _, s in expected], rtol=1e-4, atol=1e-5)
    assert language[5] == "und" and score[5] == 0.0


def test_langid_step_filters_and_annotates():
    table = _table(list(SAMPLES.values()) + ["x"])
    result = Langid(languages=["en", "de"], min_score=0.5).process(table)
    assert result.kept.column("language").to_pylist() == ["en", "de"]
    assert min(result.kept.column("language_score").to_pylist()) >= 0.5
    removed = dict(zip(result.removed.column("id").to_pylist(), result.removed.column("reason").to_pylist()))
    assert removed == {"d1": "language_fr", "d3": "language_zh", "d4": "language_low_score"}
    assert "language_score" in result.removed.column_names

    everything = Langid(min_score=0.0).process(table)  # no language list, no threshold: annotate only
    assert everything.kept.num_rows == table.num_rows and everything.removed.num_rows == 0
    again = Langid(min_score=0.0).process(everything.kept)  # rerun replaces the columns
    assert again.kept.column_names.count("language") == 1


def test_langid_rejects_unknown_language_codes():
    with pytest.raises(ValidationError, match="klingon"):
        Langid(languages=["en", "klingon"])
