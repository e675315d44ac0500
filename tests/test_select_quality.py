"""Selection base (keep rules, ties, fit rounds, target sets) and the fastText quality classifier."""

from __future__ import annotations

import json
import pickle
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import demo_docs
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.documents.schema import make_table
from tokenmill.select.base import ScoreParams, ScoreStep, TargetSet, estimate_tokens
from tokenmill.select.quality import QualityClassifier, fasttext_scores, load_fasttext, train_fasttext


def run(step: ScoreStep, shards: list[pa.Table]) -> tuple[pa.Table, pa.Table, dict]:
    """What the pipeline does: every fit round over all shards, then process each shard."""
    for _ in range(step.fit_rounds):
        step.fit_reduce([step.fit_map(s) for s in shards])
    results = [step.process(s) for s in shards]
    counters: dict[str, int] = {}
    for r in results:
        for k, v in r.counters.items():
            counters[k] = counters.get(k, 0) + v
    return (pa.concat_tables([r.kept for r in results]), pa.concat_tables([r.removed for r in results]),
            counters)


def split(table: pa.Table, parts: int) -> list[pa.Table]:
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


class LengthParams(ScoreParams):
    step: Literal["length_score"] = "length_score"


class LengthScore(ScoreStep):
    """Score = characters; counts its score calls."""

    Params = LengthParams
    calls: ClassVar[int] = 0

    def score(self, table):
        type(self).calls += 1
        return pc.utf8_length(table["text"]).to_numpy().astype(float)


class ConstantScore(LengthScore):
    def score(self, table):
        return np.ones(table.num_rows)


def pool(n: int = 60) -> pa.Table:
    rng = np.random.default_rng(0)
    return make_table({"id": f"doc{i}", "text": "w " * int(rng.integers(1, 200)), "domain": "d"}
                      for i in range(n))


def ids(table: pa.Table) -> set[str]:
    return set(table["id"].to_pylist())


# ---- keep rules -------------------------------------------------------------------------------------
def test_threshold_keeps_scores_at_or_above_it_and_scores_both_sides():
    table = pool()
    kept, removed, _ = run(LengthScore(keep={"threshold": 150}), split(table, 3))
    assert kept.num_rows + removed.num_rows == table.num_rows and kept.num_rows and removed.num_rows
    assert min(kept["length_score_score"].to_pylist()) >= 150
    assert max(removed["length_score_score"].to_pylist()) < 150
    assert set(removed["reason"].to_pylist()) == {"below_threshold"}
    assert LengthScore(keep={"threshold": 1}).fit_rounds == 0


def test_top_fraction_is_global_and_independent_of_sharding():
    table = pool()
    kept, removed, _ = run(LengthScore(keep={"top_fraction": 0.25}, score_column="len"), split(table, 4))
    assert kept.num_rows == 15
    assert min(kept["len"].to_pylist()) >= max(removed["len"].to_pylist())
    assert set(removed["reason"].to_pylist()) == {"outside_top_fraction"}
    assert ids(run(LengthScore(keep={"top_fraction": 0.25}), split(table, 1))[0]) == ids(kept)


def test_token_budget_keeps_best_documents_until_the_budget_is_reached():
    table = pool()
    step = LengthScore(keep={"token_budget": 500}, bytes_per_token=2)
    kept, removed, _ = run(step, split(table, 3))
    tokens = estimate_tokens(kept, 2)
    lowest = np.argmin(kept["length_score_score"].to_numpy())
    assert tokens.sum() >= 500 > tokens.sum() - tokens[lowest]
    assert min(kept["length_score_score"].to_pylist()) >= max(removed["length_score_score"].to_pylist())
    assert set(removed["reason"].to_pylist()) == {"over_budget"}


@pytest.mark.parametrize("keep", [{"token_budget": 10**9}, {"doc_count": 1000}])
def test_budget_larger_than_pool_keeps_all_and_says_so(keep):
    table = pool()
    kept, removed, counters = run(LengthScore(keep=keep), split(table, 3))
    assert kept.num_rows == table.num_rows and removed.num_rows == 0
    assert counters["budget_exceeds_pool"] == table.num_rows


def test_equal_scores_are_broken_at_random_by_id_hash_and_counted():
    table = pool()
    kept, _, counters = run(ConstantScore(keep={"top_fraction": 0.5}), split(table, 3))
    assert kept.num_rows == 30
    assert counters["all_scores_equal"] == table.num_rows and counters["tied_at_cutoff"] == table.num_rows
    again = run(ConstantScore(keep={"top_fraction": 0.5}), split(table, 2))[0]
    other_seed = run(ConstantScore(keep={"top_fraction": 0.5}, seed=1), split(table, 3))[0]
    assert ids(again) == ids(kept) != ids(other_seed)
    picked = np.isin(table["id"].to_numpy(zero_copy_only=False), list(ids(kept)))
    assert 0 < picked[:30].sum() < 30  # not simply the first documents in corpus order


def test_no_rule_scores_without_removing_and_reused_scores_skip_rescoring():
    table = pool()
    kept, removed, _ = run(LengthScore(), split(table, 2))
    assert kept.num_rows == table.num_rows and removed.num_rows == 0 and "length_score_score" in kept.column_names

    class Cached(LengthScore):
        reuse_fit_scores = True

    step = Cached(keep={"doc_count": 10})
    Cached.calls = 0
    shards = split(table, 3)
    step.fit_reduce([step.fit_map(s) for s in shards])
    kept = pa.concat_tables([step.process(s).kept for s in shards])
    assert Cached.calls == 3 and kept.num_rows == 10


def test_process_before_fit_and_bad_rules_fail_clearly():
    with pytest.raises(RuntimeError, match="fit round"):
        LengthScore(keep={"doc_count": 3}).process(pool())
    with pytest.raises(ValidationError, match="exactly one"):
        LengthScore(keep={"doc_count": 3, "threshold": 0.5})
    with pytest.raises(ValidationError):
        LengthScore(keep={"top_fraction": 1.5})


def test_target_set_selects_pool_rows_by_domain_or_score():
    table = make_table([{"id": str(i), "text": "x", "domain": d} for i, d in enumerate("aabbc")])
    table = table.append_column("s", pa.array([0.1, 0.9, None, 0.95, 0.2]))
    assert TargetSet(domains=["a"]).pool_mask(table).tolist() == [True, True, False, False, False]
    assert TargetSet(domains=["c"], score_column="s", min_score=0.9).pool_mask(table).tolist() == \
        [False, True, False, True, True]
    with pytest.raises(TokenmillError, match="'missing' is not a column"):
        TargetSet(score_column="missing", min_score=0).pool_mask(table)
    with pytest.raises(ValidationError, match="at least one"):
        TargetSet()


# ---- fastText quality classifier -------------------------------------------------------------------
def demo_pool(*domains: str) -> pa.Table:
    return make_table(dict(row, domain=d) for d in domains for row in demo_docs(d))


def test_train_fasttext_separates_two_styles_on_held_out_documents():
    bible, docs = [r["text"] for r in demo_docs("bible")], [r["text"] for r in demo_docs("python_docs")]
    model = train_fasttext(bible[::2], docs[::2], seed=0)
    pos, neg = fasttext_scores(model, bible[1::2]), fasttext_scores(model, docs[1::2])
    assert ((pos > 0.5).mean() + (neg < 0.5).mean()) / 2 > 0.9
    assert np.all((0 <= pos) & (pos <= 1))


def test_classifier_trained_on_pool_domain_keeps_that_domain():
    table = demo_pool("bible", "python_docs", "shakespeare")
    step = QualityClassifier(positive={"domains": ["python_docs"]}, keep={"doc_count": 37})
    assert step.fit_rounds == 2
    kept, removed, _ = run(step, split(table, 3))
    assert pc.mean(pc.equal(kept["domain"], "python_docs")).as_py() >= 0.9
    assert set(removed["reason"].to_pylist()) == {"over_budget"}
    scores = pc.mean(removed["quality_classifier_score"]).as_py()
    assert scores < pc.mean(kept["quality_classifier_score"]).as_py()


def test_classifier_from_external_positives_saves_a_model_that_scores_the_same(tmp_path):
    positives = tmp_path / "shakespeare.jsonl"
    scenes = [dict(r, text=r["text"][i:i + 3000]) for r in demo_docs("shakespeare")[5:]
              for i in range(0, len(r["text"]), 3000)]
    positives.write_text("".join(json.dumps(r) + "\n" for r in scenes), encoding="utf-8")
    table = demo_pool("bible", "python_docs")
    tail = make_table(dict(r, domain="shakespeare", id=f"s{i}") for i, r in enumerate(demo_docs("shakespeare")[:5]))
    pool_table = pa.concat_tables([table, tail])
    saved = tmp_path / "models" / "q.bin"
    step = QualityClassifier(positive={"sources": [{"path": str(positives)}]},
                             negative={"domains": ["bible", "python_docs"]},
                             keep={"doc_count": 5}, save_path=str(saved))
    kept, _, _ = run(step, split(pool_table, 2))
    assert ids(kept) == ids(tail)
    loaded = QualityClassifier(model_path=str(saved), keep={"doc_count": 5})
    assert loaded.fit_rounds == 1
    assert ids(run(loaded, [pool_table])[0]) == ids(kept)


def test_fitted_classifier_survives_pickling_to_a_worker():
    table = demo_pool("bible", "python_docs")
    step = QualityClassifier(positive={"domains": ["python_docs"]}, keep={"top_fraction": 0.1})
    for _ in range(step.fit_rounds):
        step.fit_reduce([step.fit_map(table)])
    worker_copy = pickle.loads(pickle.dumps(step))
    assert worker_copy.process(table).kept["id"].to_pylist() == step.process(table).kept["id"].to_pylist()


def test_classifier_bad_inputs_fail_clearly(tmp_path):
    table = demo_pool("bible", "python_docs")
    step = QualityClassifier(positive={"domains": ["no_such_domain"]})
    with pytest.raises(TokenmillError, match="positive training set has 0 documents"):
        run(step, [table])
    with pytest.raises(ValidationError, match="either `model_path`"):
        QualityClassifier(model_path="m.bin", positive={"domains": ["bible"]})
    with pytest.raises(TokenmillError, match="does not exist"):
        load_fasttext(str(tmp_path / "missing.bin"))
    model = train_fasttext(["in the beginning"] * 10, ["import os"] * 10)
    with pytest.raises(TokenmillError, match="no label '__label__hq'"):
        fasttext_scores(model, ["text"], "__label__hq")


def test_fasttext_that_diverges_is_retrained_at_a_lower_rate_or_refused(monkeypatch, capsys):
    import fasttext

    real, rates = fasttext.train_supervised, []

    def diverges_above(limit):
        def train(path, lr, **kwargs):
            rates.append(lr)
            if lr > limit:
                raise RuntimeError("Encountered NaN.")
            return real(path, lr=lr, **kwargs)
        return train

    texts = [d["text"] for d in demo_docs("bible", 12)], [d["text"] for d in demo_docs("python_docs", 12)]
    monkeypatch.setattr(fasttext, "train_supervised", diverges_above(0.5))
    model = train_fasttext(*texts, lr=1.0)
    assert rates == [1.0, 0.25] and "trained at lr=0.25 instead" in capsys.readouterr().out
    assert fasttext_scores(model, texts[0][:2]).shape == (2,)
    monkeypatch.setattr(fasttext, "train_supervised", diverges_above(0.0))
    with pytest.raises(TokenmillError, match="diverged .* at lr=1.0, 0.25 and 0.0625"):
        train_fasttext(*texts, lr=1.0)
