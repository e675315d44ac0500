"""Model-based selection: proxy LMs, CoLoR-Filter, perplexity bands and PreSelect on tiny demo slices."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from conftest import demo_docs
from tokenmill.documents.schema import make_table
from tokenmill.model.bpb import bits_per_byte
from tokenmill.model.hf import export_hf
from tokenmill.select.color_filter import ColorFilter
from tokenmill.select.perplexity import PerplexityBand
from tokenmill.select.preselect import PreSelect, predictive_strength
from tokenmill.select.proxy import ProxyConfig, ProxyLab, document_bits

PROXY = dict(dim=32, n_layers=1, n_heads=2, seq_len=64, batch_size=8, steps=30, warmup_steps=5, vocab_size=384,
             max_score_chars=600, device="cpu")


@pytest.fixture(scope="module")
def pool() -> list[pa.Table]:
    """Two shards mixing python_docs, bible and shakespeare documents."""
    rows = [dict(row, domain=domain) for domain, n in (("python_docs", 20), ("bible", 60), ("shakespeare", 20))
            for row in demo_docs(domain, n)]
    order = np.random.default_rng(0).permutation(len(rows))
    table = make_table([rows[i] for i in order])
    return [table.slice(0, 50), table.slice(50)]


@pytest.fixture(scope="module")
def python_target(tmp_path_factory) -> dict:
    """Python docs outside the pool, as a file: the out-of-pool target set."""
    path = tmp_path_factory.mktemp("target") / "python_docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_docs("python_docs")[20:]))
    return {"sources": [{"path": str(path)}]}


def run_step(step, shards):
    """The executor protocol, each call on a pickled copy of the step as a worker process would get."""
    def remote(method, shard):
        return getattr(pickle.loads(pickle.dumps(step)), method)(shard)

    for _ in range(step.fit_rounds):
        step.fit_reduce([remote("fit_map", shard) for shard in shards])
    return [remote("process", shard) for shard in shards]


def concat(results, part):
    return pa.concat_tables([getattr(r, part) for r in results])


def test_document_bits_match_evaluate_bpb_for_documents_within_one_window(tmp_path):
    texts = [row["text"] for row in demo_docs("bible", 40)]
    lab = ProxyLab(ProxyConfig(**PROXY), tmp_path, texts)
    (model,) = lab.train(texts, "bible", steps=5)
    texts = [text[:n] for text, n in zip(texts, (20, 60, 1, 90))]
    assert max(len(ids) for ids in lab.tokenizer(texts)["input_ids"]) < PROXY["seq_len"]
    docs = make_table({"id": str(i), "text": t, "domain": f"d{i}"} for i, t in enumerate(texts[:4]))
    reference = bits_per_byte(model, lab.tokenizer, docs, seq_len=PROXY["seq_len"])["domains"]
    mine, tokens = document_bits(model, lab.tokenizer, texts[:4], seq_len=PROXY["seq_len"], batch_size=3,
                                 device=torch.device("cpu"))
    assert mine == pytest.approx([reference[f"d{i}"]["nll_bits"] for i in range(4)], rel=1e-4)
    assert tokens == sum(reference[f"d{i}"]["tokens"] for i in range(4))


def test_proxy_training_counts_six_n_flops_per_token_and_keeps_checkpoints(tmp_path):
    texts = [row["text"] for row in demo_docs("bible", 30)]
    lab = ProxyLab(ProxyConfig(**PROXY), tmp_path, texts)
    models = lab.train(texts, "bible", steps=6, checkpoints_kept=3)
    assert len(models) == 3
    assert not torch.equal(models[0].lm_head.weight, models[-1].lm_head.weight)
    tokens = 6 * PROXY["batch_size"] * PROXY["seq_len"]
    assert lab.flops == models[-1].flops_per_token(PROXY["seq_len"]) * tokens


def test_color_filter_ranks_python_docs_above_bible_and_records_its_cost(pool, python_target):
    step = ColorFilter(target=python_target, keep={"top_fraction": 0.2}, proxy=PROXY, target_steps=20)
    results = run_step(step, pool)
    kept, removed = concat(results, "kept"), concat(results, "removed")
    scores = pa.concat_tables([kept, removed.drop_columns(["reason", "step"])])
    domain = np.array(scores["domain"].to_pylist())
    value = scores["color_filter_score"].to_numpy()
    python, bible = value[domain == "python_docs"], value[domain == "bible"]
    assert (python[:, None] > bible[None, :]).mean() > 0.9  # pairwise ranking (AUC)
    assert kept.num_rows == 20 and set(removed["reason"].to_pylist()) == {"outside_top_fraction"}

    counters = [r.counters for r in results]
    total_flops = sum(c["proxy_flops"] for c in counters)
    assert all(c["proxy_flops"] > 0 for c in counters)
    assert total_flops == pytest.approx(step.fit_cost.flops, rel=1e-6)
    assert sum(c["proxy_ms"] for c in counters) == pytest.approx(step.fit_cost.seconds * 1000, abs=len(pool))
    training = (PROXY["steps"] + 20) * PROXY["batch_size"] * PROXY["seq_len"] * step.prior.flops_per_token(64)
    assert step.fit_cost.flops > training  # scoring the pool and the target comes on top


def test_perplexity_band_keeps_the_middle_of_each_domain(pool):
    step = PerplexityBand(reference={"domains": ["bible"]}, band=["middle"], proxy=PROXY, domain_sample_docs=100)
    results = run_step(step, pool)
    kept, removed = concat(results, "kept"), concat(results, "removed")
    assert set(removed["reason"].to_pylist()) == {"perplexity_head", "perplexity_tail"}
    for table, inside in ((kept, True), (removed, False)):
        bits = -table["perplexity_band_score"].to_numpy()
        edges = np.stack([step.edges[d] for d in table["domain"].to_pylist()])
        assert (((bits > edges[:, 0]) & (bits <= edges[:, 1])) == inside).all()
    for domain, n in (("python_docs", 20), ("bible", 60), ("shakespeare", 20)):
        # the whole domain is the cut-off sample, so its middle third is kept
        assert abs(kept["domain"].to_pylist().count(domain) - n / 3) <= 1
    assert sum(r.counters["proxy_flops"] for r in results) > 0


def test_perplexity_can_rank_by_a_local_hugging_face_reference_model(pool, tmp_path):
    bible = [row["text"] for row in demo_docs("bible")[100:160]]
    lab = ProxyLab(ProxyConfig(**PROXY), tmp_path / "lab", bible)
    (reference,) = lab.train(bible, "bible")
    export_hf(reference, reference.cfg, tmp_path / "lab" / "tokenizer", tmp_path / "hf")
    step = PerplexityBand(reference_model_path=str(tmp_path / "hf"), band=None, keep={"top_fraction": 0.5},
                          proxy=PROXY)
    kept = concat(run_step(step, pool), "kept")
    assert kept.num_rows == 50
    assert kept["domain"].to_pylist().count("bible") >= 45  # 60 of the 100 are bible


def test_predictive_strength_is_the_share_of_model_pairs_ranked_as_on_the_target():
    target = np.array([3.0, 1.0, 2.0])  # model 1 is best, then model 2, then model 0
    doc_bits = np.array([[9.0, 1.0, 5.0],  # model 0 on three documents
                         [5.0, 5.0, 1.0],  # model 1
                         [1.0, 2.0, 3.0]])  # model 2
    # pairs (1, 2), (1, 0), (2, 0): document 0 agrees on the last two, 1 on none, 2 on all
    np.testing.assert_allclose(predictive_strength(doc_bits, target), [2 / 3, 0.0, 1.0])
    concordant = np.array([[3.0], [1.0], [2.0]])
    assert predictive_strength(concordant, target) == pytest.approx([1.0])
    assert np.isnan(predictive_strength(concordant, np.ones(3))).all()


def test_preselect_end_to_end_prefers_documents_like_the_target(pool, python_target):
    step = PreSelect(target=python_target, keep={"top_fraction": 0.3}, proxy=PROXY, sample_docs=50,
                     label_docs=50, domain_docs=40, target_steps=10, label_fraction=0.3)
    results = run_step(step, pool)
    kept = concat(results, "kept")
    assert kept.num_rows == 30
    assert step.family_names == ["pool", "bible", "python_docs", "shakespeare", "target"]
    assert ((step.strength >= 0) & (step.strength <= 1)).all() and step.strength.std() > 0
    # 20 of the 100 pool documents are python_docs: a random 30 would hold about 6 of them
    assert kept["domain"].to_pylist().count("python_docs") >= 15
    scores = pa.concat_tables([kept, concat(results, "removed").drop_columns(["reason", "step"])])
    domain = np.array(scores["domain"].to_pylist())
    value = scores["preselect_score"].to_numpy()
    python, bible = value[domain == "python_docs"], value[domain == "bible"]
    assert (python[:, None] > bible[None, :]).mean() > 0.9  # pairwise ranking (AUC)
    assert sum(r.counters["proxy_flops"] for r in results) == pytest.approx(step.fit_cost.flops, rel=1e-6)


def test_preselect_checkpoint_family_ranks_checkpoints_of_pool_and_target_runs(pool, python_target):
    step = PreSelect(target=python_target, family="checkpoints", keep={"top_fraction": 0.3}, proxy=PROXY,
                     sample_docs=50, label_docs=50, checkpoints=2, target_steps=10, widths=[16, 32])
    kept = concat(run_step(step, pool), "kept")
    assert kept.num_rows == 30
    assert step.family_names == ["pool-16"] * 2 + ["target-16"] * 2 + ["pool-32"] * 2 + ["target-32"] * 2
    assert ((step.strength >= 0) & (step.strength <= 1)).all()


def test_invalid_configurations_are_refused_with_the_fix():
    with pytest.raises(ValidationError, match="either `band`"):
        PerplexityBand(reference={"domains": ["bible"]}, keep={"top_fraction": 0.5})
    with pytest.raises(ValidationError, match="either `reference`"):
        PerplexityBand(band=["head"])
    with pytest.raises(ValidationError, match="at least two models"):
        PreSelect(target={"domains": ["x"]}, family="checkpoints", checkpoints=1, target_steps=0)
    with pytest.raises(ValidationError, match="target_steps > 0"):
        PreSelect(target={"domains": ["x"]}, target_steps=0)
    with pytest.raises(ValidationError, match=r"\['checkpoints', 'widths'\] do nothing with family=domains"):
        PreSelect(target={"domains": ["x"]}, widths=[32, 64], checkpoints=3)
    with pytest.raises(ValidationError, match=r"\['domain_docs'\] do nothing with family=checkpoints"):
        PreSelect(target={"domains": ["x"]}, family="checkpoints", domain_docs=100)
