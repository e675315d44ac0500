"""Dedup and decontamination steps, run as the executor runs them: fit_map per shard, fit_reduce, process."""

from __future__ import annotations

import datetime
import json
import pickle
import random

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from conftest import demo_docs
from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepResult
from tokenmill.curate.decontam import Decontaminate
from tokenmill.curate.dedup import ExactDedup, LineDedup
from tokenmill.curate.minhash import (MinHashDedup, band_hashes, connected_components,
                                      detection_probability, estimated_jaccard, minhash_signatures)
from tokenmill.documents.hashing import ngram_hashes, word_hashes
from tokenmill.documents.schema import make_table


def run_step(step: Step, shards: list[list[dict]]) -> list[StepResult]:
    return run_tables(step, [make_table(rows) for rows in shards])


def run_tables(step: Step, tables: list[pa.Table]) -> list[StepResult]:
    """fit_map per shard and process per shard in 'workers' (pickled copies), fit_reduce in order."""
    if step.needs_fit:
        step.fit_reduce([pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(step)).fit_map(t))) for t in tables])
    worker = pickle.loads(pickle.dumps(step))
    return [worker.process(t) for t in tables]


def removed(results: list[StepResult]) -> dict[str, tuple[str, str | None]]:
    """{removed id: (reason, duplicate_of or None)} over all shards."""
    out = {}
    for r in results:
        rows = r.removed.to_pylist()
        out.update({row["id"]: (row["reason"], row.get("duplicate_of")) for row in rows})
    return out


def rejected(results: list[StepResult]) -> dict[str, dict]:
    """{removed id: its rejected record} over all shards."""
    return {row["id"]: row for r in results for row in r.removed.to_pylist()}


def doc(id_: str, text: str, meta: dict | None = None) -> dict:
    return {"id": id_, "text": text, "domain": "test", "source": "test", "meta": meta or {}}


def edit_words(text: str, fraction: float, rng: random.Random) -> str:
    """Replace a ``fraction`` of the words of ``text`` (at least one) by made-up ones."""
    words = text.split()
    for position in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[position] = f"zq{rng.randrange(10**6)}"
    return " ".join(words)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Reference shingling, independent of the vectorised code: lowercased word n-grams."""
    words = "".join(c if c.isalnum() or c == "_" else " " for c in text.lower()).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def assert_estimates_jaccard(estimate: float, truth: float, num_perm: int = 112) -> None:
    """Signature agreement is binomial around the true Jaccard: allow 4 standard deviations."""
    assert abs(estimate - truth) < 4 * np.sqrt(truth * (1 - truth) / num_perm) + 0.01


# ---- exact ------------------------------------------------------------------------------------------

def test_exact_dedup_keeps_first_across_shards_and_ignores_case_and_spacing():
    first = [doc("a0", "The quick brown fox."), doc("a1", "Something else entirely."), doc("a2", "")]
    second = [doc("b0", "the  QUICK\nbrown fox.  "), doc("b1", "The quick brown fox!"), doc("b2", "")]
    results = run_step(ExactDedup(), [first, second])
    assert removed(results) == {"b0": ("exact_duplicate", "a0"), "b2": ("exact_duplicate", "a2")}
    assert results[0].kept.num_rows == 3 and results[1].kept["id"].to_pylist() == ["b1"]


def test_exact_dedup_keep_newest_by_a_column():
    rows = [doc(i, "The same text.") for i in "abcde"] + [doc("f", "Other text.")]
    day = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    fetched = [None, day, day.replace(month=3), day.replace(month=3), day.replace(month=2), day]
    table = make_table(rows).append_column("fetched", pa.array(fetched, pa.timestamp("s", tz="UTC")))
    results = run_tables(ExactDedup(keep="newest", newest_field="fetched"), [table.slice(0, 3), table.slice(3)])
    assert removed(results) == {i: ("exact_duplicate", "c") for i in "abde"}  # d ties with c, later in corpus
    assert {row["similarity"] for row in rejected(results).values()} == {1.0}


def test_exact_dedup_keep_longest_and_first():
    rows = [doc("a", "Same  text"), doc("b", "same text"), doc("c", "  SAME   TEXT  ")]
    assert removed(run_step(ExactDedup(keep="longest"), [rows])) == {"a": ("exact_duplicate", "c"),
                                                                      "b": ("exact_duplicate", "c")}
    assert removed(run_step(ExactDedup(keep="first"), [rows])) == {"b": ("exact_duplicate", "a"),
                                                                    "c": ("exact_duplicate", "a")}


@pytest.mark.parametrize("dates, message", [
    (["May 3, 2024", "2024-05-03"], "newest_field meta.date of document 'x0' is 'May 3, 2024', neither"),
    ([2024, "2024-05-03"], "holds numbers in some documents and dates in others"),
])
def test_keep_newest_refuses_values_it_cannot_compare(dates, message):
    shards = [[doc(f"x{k}", "Same text", {"date": date})] for k, date in enumerate(dates)]
    with pytest.raises(TokenmillError, match=message):
        run_step(ExactDedup(keep="newest", newest_field="meta.date"), shards)


def test_keep_newest_needs_a_field_that_exists():
    with pytest.raises(ValidationError, match="keep: newest needs newest_field"):
        MinHashDedup(keep="newest")
    with pytest.raises(ValidationError, match="newest_field is used only with keep: newest"):
        ExactDedup(newest_field="meta.date")
    with pytest.raises(TokenmillError, match="newest_field 'fetched' is no column"):
        run_step(ExactDedup(keep="newest", newest_field="fetched"), [[doc("a", "text")]])


def test_exact_dedup_without_normalisation_needs_identical_bytes():
    rows = [doc("a", "Same text"), doc("b", "same text"), doc("c", "Same text")]
    assert removed(run_step(ExactDedup(normalize=False), [rows])) == {"c": ("exact_duplicate", "a")}


# ---- minhash ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chapters() -> list[dict]:
    return [doc(f"ch{i}", d["text"]) for i, d in enumerate(demo_docs("bible", 60))]


def test_minhash_catches_planted_near_duplicates_and_spares_distinct_texts(chapters):
    rng = random.Random(0)
    copies = [doc(f"copy{i}", edit_words(chapters[i]["text"], 0.01, rng)) for i in range(0, 60, 6)]
    assert min(jaccard(c["text"], chapters[int(c["id"][4:])]["text"]) for c in copies) > 0.8
    results = run_step(MinHashDedup(), [chapters[:30], chapters[30:] + copies])
    assert removed(results) == {c["id"]: ("near_duplicate", f"ch{c['id'][4:]}") for c in copies}


def test_minhash_keep_longest_keeps_the_extended_copy(chapters):
    original = chapters[0]
    extended = doc("longer", original["text"] + " And it came to pass that the end was near.")
    results = run_step(MinHashDedup(keep="longest"), [[original, chapters[1]], [extended]])
    assert removed(results) == {original["id"]: ("near_duplicate", "longer")}
    first_kept = run_step(MinHashDedup(keep="first"), [[original, chapters[1]], [extended]])
    assert removed(first_kept) == {"longer": ("near_duplicate", original["id"])}


def ten_versions(chapter: dict) -> list[str]:
    """A text and nine successive revisions (1% of words edited each): a chain, J = 0.9 between neighbours."""
    rng = random.Random(5)
    versions = [chapter["text"]]
    for _ in range(9):
        versions.append(edit_words(versions[-1], 0.01, rng))
    return versions


def test_minhash_keep_newest_keeps_the_newest_of_ten_versions(chapters):
    versions = ten_versions(chapters[3])
    # v7 is the newest; v3's string sorts after it but is earlier in UTC; v0 has no date and loses.
    dates = [None, "2023-01-05", "2023-02-01", "2024-06-01T12:00:00+05:00", "2023-03-01", "2023-04-01",
             "2023-05-01", "2024-06-01T09:00:00Z", "2023-06-01", "2024-05-31"]
    rows = [doc(f"v{k}", text, {"date": date} if date else {}) for k, (text, date) in enumerate(zip(versions, dates))]
    results = run_step(MinHashDedup(keep="newest", newest_field="meta.date"), [rows[:5] + chapters[:2], rows[5:]])
    assert removed(results) == {f"v{k}": ("near_duplicate", "v7") for k in range(10) if k != 7}
    for k, row in ((int(i[1:]), row) for i, row in rejected(results).items()):
        assert_estimates_jaccard(row["similarity"], jaccard(versions[k], versions[7]))


def test_minhash_keep_longest_keeps_the_longest_of_ten_versions(chapters):
    versions = ten_versions(chapters[3])
    versions[6] += " And it came to pass that the end was near, and they went out into the field together."
    assert max(map(len, versions)) == len(versions[6])
    rows = [doc(f"v{k}", text) for k, text in enumerate(versions)]
    results = run_step(MinHashDedup(keep="longest"), [rows[:5], rows[5:] + chapters[:2]])
    assert removed(results) == {f"v{k}": ("near_duplicate", "v6") for k in range(10) if k != 6}
    for k, row in ((int(i[1:]), row) for i, row in rejected(results).items()):
        assert_estimates_jaccard(row["similarity"], jaccard(versions[k], versions[6]))


def test_minhash_reports_a_chained_member_s_own_similarity_to_the_kept_document(chapters):
    rng = random.Random(3)

    def edit_half(text: str, second: bool) -> str:
        words = text.split()
        half = len(words) // 2
        for position in rng.sample(range(half * second, half * (1 + second)), round(0.025 * len(words))):
            words[position] = f"zq{rng.randrange(10**6)}"
        return " ".join(words)

    a = chapters[4]["text"]
    b = edit_half(a, second=False)
    c = edit_half(b, second=True)
    assert min(jaccard(a, b), jaccard(b, c)) > 0.8 > 0.7 > jaccard(a, c)  # c is near b only
    results = run_step(MinHashDedup(), [[doc("a", a), doc("b", b)], [doc("c", c)]])
    assert removed(results) == {"b": ("near_duplicate", "a"), "c": ("near_duplicate", "a")}
    similarity = rejected(results)["c"]["similarity"]
    assert similarity < 0.7
    assert_estimates_jaccard(similarity, jaccard(a, c))
    assert [r.counters["chained_duplicates"] for r in results] == [0, 1]


def test_minhash_handles_empty_and_short_documents():
    rows = [doc("e1", ""), doc("e2", "!!!"), doc("s1", "two words"), doc("s2", "Two, words.")]
    assert removed(run_step(MinHashDedup(), [rows, []])) == {"s2": ("near_duplicate", "s1")}


def test_signature_agreement_estimates_true_jaccard(chapters):
    rng = random.Random(1)
    texts = [chapters[2]["text"]] + [edit_words(chapters[2]["text"], f, rng) for f in (0.01, 0.03, 0.1)]
    step = MinHashDedup(num_perm=256, bands=32, rows=8)
    shingle_hashes, offsets = ngram_hashes(*word_hashes(pa.array(texts)), 5)
    signatures = minhash_signatures(shingle_hashes, offsets, *step.hash_functions())
    estimates = estimated_jaccard(signatures, np.zeros(3, int), np.arange(1, 4))
    for text, estimate in zip(texts[1:], estimates):
        truth = jaccard(texts[0], text)
        assert abs(estimate - truth) < 4 * np.sqrt(truth * (1 - truth) / 256) + 0.01


def test_detection_probability_matches_simulated_banding():
    rng = np.random.default_rng(0)
    bands, rows, pairs = 16, 7, 4000
    for s in (0.5, 0.7, 0.8):
        left = rng.integers(0, 2**32, (pairs, bands * rows), dtype=np.uint32)
        right = np.where(rng.random(left.shape) < s, left, left ^ np.uint32(1))
        shared = (band_hashes(left, bands, rows) == band_hashes(right, bands, rows)).any(axis=1).mean()
        expected = detection_probability(s, bands, rows)
        assert abs(shared - expected) < 4 * np.sqrt(expected * (1 - expected) / pairs) + 1e-3
    # the module doc's claim: FineWeb's 14 x 8 misses >5% of pairs at Jaccard 0.8, the default 16 x 7 does not
    assert detection_probability(0.8, 14, 8) < 0.95 < detection_probability(0.8, 16, 7)


def test_minhash_params_must_cover_the_signature():
    with pytest.raises(ValidationError, match="bands × rows must equal num_perm"):
        MinHashDedup(num_perm=100, bands=16, rows=7)


def test_connected_components_labels_each_node_with_its_component_minimum():
    rng = np.random.default_rng(0)
    count = 300
    first, second = rng.integers(0, count, (2, 250))
    labels = connected_components(count, first, second)
    parent = list(range(count))  # reference: plain union-find

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(first.tolist(), second.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert labels.tolist() == [find(x) for x in range(count)]


# ---- line dedup -------------------------------------------------------------------------------------

def test_line_dedup_removes_lines_seen_in_earlier_documents():
    banner = "Copyright (c) the example project, all rights reserved."
    first = [doc("a", f"{banner}\nFirst document body with its own words.\n{banner}\nok")]
    second = [
        doc("b", f"Second document body, different words here.\n{banner.upper()}\nok"),
        doc("c", f"{banner}\n  {banner}  "),
    ]
    results = run_step(LineDedup(min_line_chars=20, min_doc_chars=10), [first, second, []])
    assert results[0].kept["text"].to_pylist() == [first[0]["text"]]  # repeats inside the first holder stay
    assert results[1].kept["text"].to_pylist() == ["Second document body, different words here.\nok"]
    assert removed(results) == {"c": ("line_dedup_empty", None)}
    assert results[1].removed["text"].to_pylist() == [second[1]["text"]]
    assert results[1].counters == {"lines_removed": 3, "docs_with_lines_removed": 2}


# ---- decontamination --------------------------------------------------------------------------------

PASSAGE = ("In the beginning God created the heaven and the earth, and the earth was without form and "
           "void, and darkness was upon the face of the deep.")


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "evalset.jsonl"
    records = [{"question": PASSAGE, "qid": "q-genesis"},
               {"question": "A completely different question about sailing ships and harbours at dawn.", "qid": "q-ships"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def contaminated_corpus() -> list[list[dict]]:
    leaked = f"Some preamble words here. {PASSAGE.upper().replace(',', ' ;')} And more text after it."
    return [[doc("clean1", "Nothing to see here, only ordinary text about the weather today."), doc("leak1", leaked)],
            [doc("leak2", "Quoted: " + PASSAGE), doc("near", " ".join(PASSAGE.split()[:12]))]]


def test_decontaminate_drops_documents_sharing_an_eval_ngram(eval_file):
    step = Decontaminate(eval_paths=[eval_file], text_field="question", id_field="qid")
    results = run_step(step, contaminated_corpus() + [[]])
    assert removed(results) == {"leak1": ("contaminated", None), "leak2": ("contaminated", None)}
    counters = {}
    for r in results:
        for key, value in r.counters.items():
            counters[key] = counters.get(key, 0) + value
    assert Decontaminate.hits_report(counters) == {"q-genesis": 2}
    assert counters["contaminated_docs"] == 2


def test_decontaminate_flag_mode_and_txt_items(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text(f"unrelated line about harbours and sailing ships at dawn\n\n{PASSAGE}\n")
    results = run_step(Decontaminate(eval_paths=[path], mode="flag"), contaminated_corpus())
    flags = {i: f for r in results for i, f in zip(r.kept["id"].to_pylist(), r.kept["contaminated"].to_pylist())}
    assert flags == {"clean1": False, "leak1": True, "leak2": True, "near": False}
    assert all(r.removed.num_rows == 0 for r in results)
    assert Decontaminate.hits_report(results[0].counters) == {f"{path}:3": 1}


def test_decontaminate_min_matches_requires_several_ngrams(eval_file):
    shingled = " ".join(PASSAGE.split()[:14])  # exactly two 13-grams of the passage
    rows = [[doc("two", shingled), doc("one", " ".join(PASSAGE.split()[:13]))]]
    step = Decontaminate(eval_paths=[eval_file], text_field="question", min_matches=2)
    assert removed(run_step(step, rows)) == {"two": ("contaminated", None)}


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\nnot json\n', r"evalset.jsonl:2 is not valid JSON"),
    ('{"question": "no text field"}\n', r"evalset.jsonl:1 has no string field 'text'"),
])
def test_decontaminate_bad_eval_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "evalset.jsonl"
    path.write_text(content)
    with pytest.raises(TokenmillError, match=message):
        Decontaminate(eval_paths=[path])
    with pytest.raises(TokenmillError, match="does not exist"):
        Decontaminate(eval_paths=[tmp_path / "missing.jsonl"])
