"""Model growth (G_stack): a deeper model starts from a smaller one's blocks stacked in depth."""

from __future__ import annotations

import shutil

import pytest
import torch
from pydantic import ValidationError

from test_train import model_cfg, read_metrics, tokens, train_cfg  # noqa: F401  (tokens is a fixture)
from tokenmill import TokenmillError
from tokenmill.model import Llama, ModelConfig, export_hf
from tokenmill.model.growth import stack
from tokenmill.train.sources import load_source, source_folders
from tokenmill.tokens.tokenizer import train_tokenizer
from tokenmill.train import loop
from tokenmill.train.checkpoint import load_trained_model


def grown_cfg(n_layers: int, source: str = "unused", **overrides) -> ModelConfig:
    return model_cfg(n_layers=n_layers, grow_from=source, grow={"depth": 2}, **overrides)


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_one_layer_stacked_twice_runs_its_block_twice():
    torch.manual_seed(0)
    small, big = Llama(model_cfg(n_layers=1)).eval(), Llama(grown_cfg(2)).eval()
    stack(big, small, depth=2)
    assert_same(big.layers[0], small.layers[0])
    assert_same(big.layers[1], small.layers[0])
    for part in ("embed_tokens", "norm", "lm_head"):
        assert_same(getattr(big, part), getattr(small, part))

    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        cos, sin = small.rope_cos[:16], small.rope_sin[:16]
        x = small.embed_tokens(idx)
        x = small.layers[0](small.layers[0](x, cos, sin, None), cos, sin, None)
        torch.testing.assert_close(big(idx), small.lm_head(small.norm(x)), rtol=0, atol=0)


def test_the_whole_stack_repeats_in_order():
    torch.manual_seed(0)
    small, big = Llama(model_cfg(n_layers=2)), Llama(grown_cfg(4))
    stack(big, small, depth=2)
    for i, j in enumerate([0, 1, 0, 1]):  # block i copies block i mod L, not 0, 0, 1, 1
        assert_same(big.layers[i], small.layers[j])
    assert not torch.equal(small.layers[0].mlp.up_proj.weight, small.layers[1].mlp.up_proj.weight)


def test_shape_mismatches_are_named():
    small = Llama(model_cfg(n_layers=1))
    with pytest.raises(TokenmillError, match=r"differs in dim: 64 in grow_from, 128 in model"):
        stack(Llama(grown_cfg(2, dim=128, n_heads=8, n_kv_heads=4)), small, depth=2)
    with pytest.raises(TokenmillError, match=r"model.n_layers=3 but model.grow.depth=2 × grow_from's 1 layers = 2"):
        stack(Llama(grown_cfg(3)), small, depth=2)
    with pytest.raises(ValidationError, match="grow_from and grow go together"):
        model_cfg(grow_from="/some/run")
    with pytest.raises(ValidationError, match="init_from and grow_from"):
        grown_cfg(2, init_from="/some/hf")
    with pytest.raises(TokenmillError, match="neither a Hugging Face model folder"):
        load_source("/no/such/run")


def test_training_grows_from_a_run_folder_end_to_end(tokens, tmp_path):
    """A 1-layer run trains; a 2-layer run grows from its folder (checkpoints, then its model/ export) and
    starts from exactly the stacked weights."""
    small_run = tmp_path / "small"
    loop.train(model_cfg(n_layers=1), train_cfg(max_steps=10), tokens, small_run / "train", progress=False)
    shutil.copytree(tokens.parent / "tokenizer", small_run / "tokens" / "tokenizer")
    small = load_trained_model(small_run / "train" / "checkpoints")[0]

    grown = grown_cfg(2, str(small_run))
    loop.train(grown, train_cfg(max_steps=2, lr=0.0), tokens, tmp_path / "still", progress=False)
    start = load_trained_model(tmp_path / "still" / "checkpoints")[0]
    assert_same(start.layers[0], small.layers[0])
    assert_same(start.layers[1], small.layers[0])

    export_hf(small, small.cfg, small_run / "tokens" / "tokenizer", small_run / "model")
    assert source_folders(small_run) == (small_run / "model", small_run / "tokens" / "tokenizer")
    summary = loop.train(grown, train_cfg(max_steps=10), tokens, tmp_path / "big", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "big") if "loss" in r]
    first_small = next(r["loss"] for r in read_metrics(small_run / "train") if "loss" in r)
    assert summary["steps"] == 10 and losses[0] < first_small  # starts where training left off, not from scratch


def test_run_refuses_a_tokenizer_other_than_the_smaller_models(tokens, tmp_path):
    from tokenmill.recipe import parse_recipe
    from tokenmill.run import Runner

    small_run = tmp_path / "small"
    torch.manual_seed(0)
    export_hf(Llama(model_cfg(n_layers=1)), model_cfg(n_layers=1), tokens.parent / "tokenizer", small_run / "model")
    shutil.copytree(tokens.parent / "tokenizer", small_run / "tokens" / "tokenizer")
    train_tokenizer(["the quick brown fox"] * 20, vocab_size=280, out_dir=tmp_path / "run" / "tokens" / "tokenizer")
    grown = {"preset": "tiny", "n_layers": 2, "grow_from": str(small_run), "grow": {"depth": 2}}
    recipe = parse_recipe({"name": "g", "sources": [{"path": "x.jsonl"}], "model": grown,
                           "train": {"seq_len": 256}})
    with pytest.raises(TokenmillError, match=f"set tokenizer.path: {small_run / 'tokens' / 'tokenizer'}"):
        Runner(recipe, tmp_path / "run", progress=False).model_config()
