"""Mixtures over training: exact phase schedules, resume mid-phase, DoReMi, loss-based sequence weights, MeCo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.tokens.loader import TokenDataset, TokenLoader, eval_windows, natural_weights
from tokenmill.tokens.mixture import ScheduledMixture
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import load_tokenizer, train_tokenizer
from tokenmill.train import loop
from tokenmill.train.config import DoReMiConfig, MixtureConfig, TrainConfig
from tokenmill.train.mixing import DoReMi, build_mixture, metadata_view, sequence_weights

from test_train import model_cfg, read_metrics, tokens, train_cfg, train_killed  # noqa: F401 (tokens: a fixture)

DOMAINS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Three domains of distinct words, each with a `source` in the token index for MeCo."""
    root = tmp_path_factory.mktemp("mix")
    words = {"a": "alpha apple anchor", "b": "beta banana bridge", "c": "gamma cherry canyon"}
    rows = [(f"{d}-{i}", f"{words[d]} {i} " * (3 + i % 5), d, f"{d}.example.org") for d in DOMAINS for i in range(60)]
    ids, text, domain, source = zip(*rows)
    tokenizer = train_tokenizer(list(text), vocab_size=300, out_dir=root / "tokenizer")
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain, "source": source}), root / "docs.parquet")
    pack_documents([root / "docs.parquet"], tokenizer, root / "packed")
    index = pq.read_table(root / "packed" / "index.parquet")  # what pack.index_fields: [source] keeps
    by_id = dict(zip(ids, source))
    pq.write_table(index.append_column("source", pa.array([by_id[i] for i in index.column("doc_id").to_pylist()])),
                   root / "packed" / "index.parquet")
    return root


def test_phase_schedule_is_realised_exactly_in_every_prefix():
    w1, w2 = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])
    mixture = ScheduledMixture(DOMAINS, [(1000, w1), (0, w2)], seed=4)
    domain, k = mixture.draw(np.arange(2600))
    for lo, hi, w in ((0, 1000, w1), (1000, 2600, w2)):
        for n in range(lo + 1, hi + 1):  # every prefix of the phase, ± 2 per domain, and the whole ± 1
            counts = np.bincount(domain[lo:n], minlength=3)
            assert np.all(np.abs(counts - w * (n - lo)) < 2), (lo, n, counts)
        assert np.all(np.abs(np.bincount(domain[lo:hi], minlength=3) - w * (hi - lo)) <= 1)
    for d in range(3):  # each domain's sequences are numbered 0, 1, 2, ... across the phases, none twice
        assert np.array_equal(k[domain == d], np.arange((domain == d).sum()))
    shuffled = np.random.default_rng(0).permutation(2600)  # a pure function of g: any order, any chunking
    assert np.array_equal(mixture.draw(shuffled)[1], k[shuffled])


def test_upsampling_phase_follows_natural_then_multiplies(packed):
    dataset = TokenDataset(packed / "packed")
    cfg = TrainConfig(seq_len=8, micro_batch_size=4, global_batch_tokens=32, max_steps=100,
                      mixture={"phases": [{"until": 0.8}, {"until": 1.0, "upsample": {"c": 4}}]})
    mixture = build_mixture(cfg, dataset)
    natural = np.array([dataset.n_tokens(d) for d in DOMAINS], float)
    natural /= natural.sum()
    domain, _ = mixture.draw(np.arange(400))
    first, last = np.bincount(domain[:320], minlength=3), np.bincount(domain[320:], minlength=3)
    assert np.all(np.abs(first - natural * 320) < 2)
    boosted = natural * [1, 1, 4] / (natural @ [1, 1, 4])
    assert np.all(np.abs(last - boosted * 80) < 2) and last[2] / 80 > 1.5 * natural[2]


def test_resume_mid_phase_gives_the_identical_token_stream(packed):
    dataset = TokenDataset(packed / "packed")
    cfg = TrainConfig(seq_len=8, micro_batch_size=2, global_batch_tokens=32, max_steps=20,
                      mixture={"phases": [{"until": 0.5, "weights": {"a": 1}}, {"until": 1.0, "upsample": {"b": 3}}]})
    make = lambda: TokenLoader(dataset, 8, 2, seed=7, mixture=build_mixture(cfg, dataset))
    whole = make()
    stream = [next(iter(whole)) for _ in range(60)]
    killed = make()
    for _ in range(27):  # killed in the second phase, which starts at step 10 = micro-batch 20
        next(iter(killed))
    resumed = make()
    resumed.load_state_dict(killed.state_dict())
    for expected in stream[27:]:
        got = next(iter(resumed))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert {int(d) for _, _, dom in stream[:20] for d in dom} == {0}  # phase one: only a
    assert {int(d) for _, _, dom in stream[20:] for d in dom} > {0}


def test_phases_and_weights_are_checked():
    with pytest.raises(ValidationError, match="cover the whole"):
        MixtureConfig(phases=[{"until": 0.5}])
    with pytest.raises(ValidationError, match="increasing"):
        MixtureConfig(phases=[{"until": 0.5}, {"until": 0.4}, {"until": 1.0}])
    with pytest.raises(ValidationError, match=">= 0"):
        MixtureConfig(phases=[{"until": 1.0, "weights": {"a": -1}}])
    with pytest.raises(ValidationError, match="not all 0"):
        MixtureConfig(phases=[{"until": 1.0, "weights": {"a": 0}}])
    with pytest.raises(ValidationError, match="not both"):
        TrainConfig(domain_weights={"a": 1}, mixture={"phases": [{"until": 1.0}]})
    with pytest.raises(ValidationError, match="reference"):
        MixtureConfig(online="doremi")


def test_unknown_domain_in_a_phase_is_refused(packed):
    dataset = TokenDataset(packed / "packed")
    cfg = TrainConfig(seq_len=8, micro_batch_size=4, global_batch_tokens=32,
                      mixture={"phases": [{"until": 1.0, "upsample": {"code": 2}}]})
    with pytest.raises(TokenmillError, match=r"unknown domain\(s\) \['code'\]"):
        build_mixture(cfg, dataset)


# ---- DoReMi and loss-based sequence weights ----------------------------------------------------


def test_doremi_update_matches_exponentiated_gradient_on_two_domains():
    """Domain a is 1 nat above its reference and b at it: after n steps w_a / w_b = e^(eta · n), and with
    smoothing each step's weights move 1e-3 toward uniform."""
    doremi = DoReMi(DoReMiConfig(reference="x", step_size=0.5, smoothing=0.0), np.array([0.5, 0.5]),
                    reference=np.array([2.0, 3.0]))
    for _ in range(4):
        doremi.update(loss_sum=np.array([3.0 * 8, 2.5 * 8]), count=np.array([8, 8]))  # b below reference: 0
    assert doremi.weights[0] / doremi.weights[1] == pytest.approx(np.exp(0.5 * 4))
    smoothed = DoReMi(DoReMiConfig(reference="x"), np.array([0.5, 0.5]), reference=np.array([2.0, 3.0]))
    smoothed.update(np.array([3.0, 0.0]), np.array([1, 0]))  # b absent from the batch: excess 0
    raw = np.array([np.e, 1.0]) / (np.e + 1)
    assert smoothed.weights == pytest.approx(0.999 * raw + 0.001 * 0.5)
    assert smoothed.mean == pytest.approx(smoothed.weights)
    # the loss of a sequence of domain d is weighted alpha_d / sampled_d: the step minimises sum_d alpha_d L_d
    ratio = smoothed.sequence_weights(torch.tensor([0, 1, 1]))
    assert ratio.tolist() == pytest.approx([smoothed.weights[0] / 0.5, smoothed.weights[1] / 0.5, smoothed.weights[1] / 0.5])


def test_sequence_weights_favour_hard_sequences_and_keep_the_mean():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = sequence_weights(loss, temperature=1.0)
    assert w.mean() == pytest.approx(1.0) and torch.all(w[1:] > w[:-1])
    assert torch.allclose(sequence_weights(torch.full((4,), 2.5), 0.3), torch.ones(4))


def doremi_reference(tmp_path: Path) -> Path:
    ref = tmp_path / "ref" / "train"
    ref.mkdir(parents=True)
    ref.joinpath("metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 3.0, "val_loss/prose": 2.0,
                                                         "val_loss/code": 4.0}) + "\n")
    return ref.parent


def test_doremi_run_logs_weights_each_step_and_resumes_to_the_same_run(tokens, tmp_path, monkeypatch):
    mixture = {"online": "doremi", "doremi": {"reference": str(doremi_reference(tmp_path))}}
    cfg = train_cfg(max_steps=12, ckpt_every=5, eval_every=100, mixture=mixture)
    whole = loop.train(model_cfg(), cfg, tokens, tmp_path / "whole", progress=False)
    weights = [r for r in read_metrics(tmp_path / "whole") if "weight/code" in r]
    assert [r["step"] for r in weights] == list(range(1, 13))
    natural = dict(zip(["code", "prose"], natural_weights(TokenDataset(tokens))))
    assert weights[0]["weight/code"] == pytest.approx(natural["code"])  # it starts from natural proportions
    assert weights[-1]["weight/prose"] > weights[-1]["weight/code"]  # prose is far above its reference of 2
    assert set(whole["doremi_mean_weights"]) == {"code", "prose"}
    train_killed(cfg, tokens, tmp_path / "killed", monkeypatch, die_in_step=8)
    resumed = loop.train(model_cfg(), cfg, tokens, tmp_path / "killed", progress=False)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-6)
    assert resumed["doremi_mean_weights"] == pytest.approx(whole["doremi_mean_weights"])
    realised = [r for r in read_metrics(tmp_path / "killed") if "mix/code" in r]  # the data keep natural shares
    assert realised and all(abs(r["mix/code"] - natural["code"]) < 0.1 for r in realised)


# ---- MeCo -------------------------------------------------------------------------------------


def test_meco_prefixes_carry_no_loss_and_end_at_the_cooldown(packed):
    dataset = TokenDataset(packed / "packed")
    tokenizer = load_tokenizer(packed / "tokenizer")
    cfg = TrainConfig(seq_len=16, micro_batch_size=4, global_batch_tokens=64, max_steps=10,
                      metadata={"field": "source", "template": "{value}\n", "cooldown_fraction": 0.3})
    view, until = metadata_view(cfg, dataset, packed / "tokenizer")
    assert until == 7 * 4  # 7 of 10 steps with metadata, 4 sequences a step
    loader = TokenLoader(dataset, 16, 4, seed=0, metadata=view, metadata_until=until)
    prefix_ids = {d: tokenizer.encode(f"{d}.example.org\n", add_special_tokens=False) for d in DOMAINS}
    masked_before = masked_after = 0
    for step in range(10):
        x, y, domain = loader.batch(step)
        masked = (y == -1).sum().item()
        if step < 7:
            masked_before += masked
            for row, d in zip(range(4), domain.tolist()):  # every masked run of targets is the domain's prefix
                targets, inputs = y[row].tolist(), x[row].tolist()
                for t in range(15):  # target t is input t + 1
                    if targets[t] == -1:
                        assert inputs[t + 1] in prefix_ids[DOMAINS[d]]
        else:
            masked_after += masked
    assert masked_before > 0 and masked_after == 0
    # each prefix is followed by its own document
    first_word = {"a": "alpha", "b": "beta", "c": "gamma"}
    texts = [(tokenizer.decode(row.tolist()), DOMAINS[d]) for step in range(7)
             for row, d in zip(loader.batch(step)[0], loader.batch(step)[2].tolist())]
    following = [(m.group(1), m.group(2), d) for t, d in texts for m in re.finditer(r"(\w)\.example\.org\n\s*(\w+)", t)]
    assert len(following) >= 5
    assert all(x == d and first_word[d].startswith(word) for x, word, d in following)
    # evaluation windows come from the plain stream
    for wx, wy in eval_windows(dataset, 16, 4).values():
        assert (wy >= 0).all() and "example.org" not in tokenizer.decode(wx.flatten().tolist())


def test_meco_needs_the_field_in_the_token_index(packed):
    dataset = TokenDataset(packed / "packed")
    cfg = TrainConfig(seq_len=16, micro_batch_size=4, global_batch_tokens=64, metadata={"field": "meta.url"})
    with pytest.raises(TokenmillError, match="index_fields"):
        metadata_view(cfg, dataset, packed / "tokenizer")


# ---- the recipe: checked at `tokenmill validate` time ---------------------------------------------

DEMO = Path(__file__).parents[1] / "src" / "tokenmill" / "recipes" / "demo.yaml"


@pytest.mark.parametrize("override, message", [
    ("train.domain_weights={bible: 1, code: 2}", r"names \['code'\].*\['bible', 'python_docs', 'shakespeare'\]"),
    ("train.mixture={phases: [{until: 0.8}]}", "cover the whole budget"),
    ("train.mixture={phases: [{until: 1.0, upsample: {bible: -2}}]}", ">= 0"),
    ("train.mixture={phases: [{until: 1.0, weights: {bible: 0}}]}", "not all 0"),
    ("pack.domain_field=cluster", "needs a cluster step"),
])
def test_bad_mixtures_are_refused_when_the_recipe_is_validated(override, message):
    from tokenmill.recipe import load_recipe

    with pytest.raises(TokenmillError, match=message):
        load_recipe(DEMO, [override], preflight=True)


def test_cluster_streams_are_named_by_the_cluster_step():
    from tokenmill.recipe import load_recipe

    steps = "curate.steps=[{step: cluster, n_clusters: 12, backend: tfidf}]"
    recipe = load_recipe(DEMO, [steps, "pack.domain_field=cluster", "train.domain_weights={cluster-03: 1, cluster-11: 2}"])
    assert recipe.train.domain_weights == {"cluster-03": 1, "cluster-11": 2}
    with pytest.raises(TokenmillError, match=r"names \['cluster-12'\]"):
        load_recipe(DEMO, [steps, "pack.domain_field=cluster", "train.domain_weights={cluster-12: 1}"])


def test_meco_field_is_kept_in_the_token_index():
    from tokenmill.recipe import load_recipe

    assert load_recipe(DEMO, ["train.metadata={field: meta.url}"]).pack.index_fields == ["meta.url"]
    assert load_recipe(DEMO, ["train.metadata={field: domain}"]).pack.index_fields == []  # always there
