"""DSIR: hashed n-gram importance weights and Gumbel top-k resampling towards a target."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import demo_docs

from tokenmill import TokenmillError
from tokenmill.documents.schema import make_table
from tokenmill.select.base import estimate_tokens, id_keys
from tokenmill.select.dsir import Dsir, gumbel_noise, ngram_buckets

COOKING = ["stir the flour and sugar into the butter then bake in a hot oven",
           "boil the pasta in salted water and drain it before adding the sauce",
           "whisk the eggs with milk and pour the batter into a buttered pan",
           "season the soup with salt and pepper and simmer it for an hour",
           "knead the dough until smooth and let it rise before you bake it"]
SPORTS = ["the striker scored a late goal and the home team won the match",
          "the coach praised the defence after the league game on saturday",
          "the goalkeeper saved a penalty in the final minute of the cup tie",
          "fans cheered as the players lifted the trophy after the final whistle",
          "the referee showed a red card and the team played with ten men"]


def run(step: Dsir, shards: list[pa.Table]) -> tuple[pa.Table, pa.Table]:
    for _ in range(step.fit_rounds):
        step.fit_reduce([step.fit_map(s) for s in shards])
    results = [step.process(s) for s in shards]
    return pa.concat_tables([r.kept for r in results]), pa.concat_tables([r.removed for r in results])


def kitchen_pool() -> pa.Table:
    rows = [{"id": f"{kind}{i}-{j}", "text": text, "domain": kind}
            for j in range(4) for kind, texts in (("cook", COOKING), ("sport", SPORTS))
            for i, text in enumerate(texts)]
    return make_table(rows)


def test_ngram_features_are_unigrams_and_bigrams_within_each_document():
    buckets, rows = ngram_buckets(pa.array(["a b c", "d", ""]), 1000)
    assert np.bincount(rows, minlength=3).tolist() == [5, 1, 0]  # 3 words + 2 bigrams; 1 word; nothing
    assert buckets.max() < 1000
    again, _ = ngram_buckets(pa.array(["a b c"]), 1000)
    assert again.tolist() == buckets[rows == 0].tolist()


def test_dsir_picks_the_target_topic_from_external_target_files(tmp_path):
    target = tmp_path / "recipes.jsonl"
    target.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in COOKING), encoding="utf-8")
    table = kitchen_pool()
    kept, removed = run(Dsir(target={"sources": [{"path": str(target)}]}, keep={"doc_count": 20}),
                        [table.slice(0, 17), table.slice(17)])
    assert all(i.startswith("cook") for i in kept["id"].to_pylist()) and kept.num_rows == 20
    assert pc.min(kept["dsir_score"]).as_py() > pc.max(removed["dsir_score"]).as_py()
    assert set(removed["reason"].to_pylist()) == {"over_budget"}


def test_dsir_with_a_pool_domain_target_on_real_text_and_a_token_budget():
    table = make_table(dict(r, domain=d) for d in ("bible", "python_docs", "shakespeare") for r in demo_docs(d))
    step = Dsir(target={"domains": ["python_docs"], "max_docs": 20}, keep={"token_budget": 100_000})
    assert step.fit_rounds == 2
    kept, removed = run(step, [table.slice(0, 100), table.slice(100, 100), table.slice(200)])
    assert pc.mean(pc.equal(kept["domain"], "python_docs")).as_py() > 0.9
    tokens = estimate_tokens(kept, 4.0)
    keys = step.selection_keys(kept, kept["dsir_score"].to_numpy())
    assert tokens.sum() >= 100_000 > tokens.sum() - tokens[np.argmin(keys)]


def test_selection_does_not_depend_on_sharding_and_resample_false_is_top_k():
    table = kitchen_pool()
    target = {"domains": ["cook"]}
    one = run(Dsir(target=target, keep={"doc_count": 7}), [table])[0]
    three = run(Dsir(target=target, keep={"doc_count": 7}), [table.slice(0, 10), table.slice(10, 10),
                                                             table.slice(20)])[0]
    assert sorted(one["id"].to_pylist()) == sorted(three["id"].to_pylist())
    assert pc.all(pc.equal(one["domain"], "cook")).as_py()
    kept, removed = run(Dsir(target=target, keep={"doc_count": 7}, resample=False), [table])
    assert pc.min(kept["dsir_score"]).as_py() >= pc.max(removed["dsir_score"]).as_py()
    assert pc.count_distinct(kept["text"]).as_py() < pc.count_distinct(one["text"]).as_py()  # noise spreads picks


def test_gumbel_top_1_samples_in_proportion_to_importance_weights():
    weights = np.log([1.0, 2.0, 3.0])
    ids = pa.array(["a", "b", "c"])
    seeds = range(3000)
    picks = [np.argmax(weights + gumbel_noise(id_keys(ids, seed))) for seed in seeds]
    freq = np.bincount(picks, minlength=3) / len(picks)
    assert np.allclose(freq, [1 / 6, 2 / 6, 3 / 6], atol=0.03)


def test_empty_target_fails_clearly():
    with pytest.raises(TokenmillError, match="target set is empty"):
        run(Dsir(target={"domains": ["nowhere"]}, keep={"doc_count": 3}), [kitchen_pool()])
