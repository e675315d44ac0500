"""Dedup and decontamination steps, run as the executor runs them: fit_map per shard, fit_reduce, process."""

from __future__ import annotations

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
from tokenmill.curate.dedup import ExactDedup, LineDedup, word_hashes
from tokenmill.curate.minhash import (MinHashDedup, band_hashes, connected_components,
                                      detection_probability, estimated_jaccard, minhash_signatures,
                                      ngram_hashes)
from tokenmill.documents.schema import make_table


def run_step(step: Step, shards: list[list[dict]]) -> list[StepResult]:
    """fit_map per shard and process per shard in 'workers' (pickled copies), fit_reduce in order."""
    tables = [make_table(rows) for rows in shards]
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


def doc(id_: str, text: str) -> dict:
    return {"id": id_, "text": text, "domain": "test", "source": "test"}


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


# ---- exact ------------------------------------------------------------------------------------------

def test_exact_dedup_keeps_first_across_shards_and_ignores_case_and_spacing():
    first = [doc("a0", "The quick brown fox."), doc("a1", "Something else entirely."), doc("a2", "")]
    second = [doc("b0", "the  QUICK\nbrown fox.  "), doc("b1", "The quick brown fox!"), doc("b2", "")]
    results = run_step(ExactDedup(), [first, second])
    assert removed(results) == {"b0": ("exact_duplicate", "a0"), "b2": ("exact_duplicate", "a2")}
    assert results[0].kept.num_rows == 3 and results[1].kept["id"].to_pylist() == ["b1"]


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
