"""SLTrain: block weights as a low-rank product plus a fixed random sparse support, applied from outside
the model; it trains, resumes bit-identically and exports dense weights transformers loads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from test_train import model_cfg, read_metrics, tokens, train_cfg, train_killed  # noqa: F401  (tokens is a fixture)
from tokenmill import TokenmillError
from tokenmill.model import Llama, export_hf
from tokenmill.train import loop
from tokenmill.train.checkpoint import latest_checkpoint, load_checkpoint
from tokenmill.train.config import SLTrainConfig
from tokenmill.train.sltrain import apply_sltrain

SETTINGS = {"name": "sltrain", "rank": 8, "density": 0.1, "alpha": 16}


def sltrain_model(seed: int = 0, **settings) -> Llama:
    torch.manual_seed(seed)
    model = Llama(model_cfg())
    apply_sltrain(model, SLTrainConfig(**{**SETTINGS, **settings}), model_cfg(), seed)
    return model


def body_params(model: Llama) -> int:
    return sum(p.numel() for p in model.layers.parameters() if p.requires_grad)


def test_block_linears_become_low_rank_plus_sparse_with_fewer_parameters():
    dense, model = Llama(model_cfg()), sltrain_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert sum(parametrize.is_parametrized(m, "weight") for m in linears) == 7 * model.cfg.n_layers
    assert not parametrize.is_parametrized(model.lm_head) and model.embed_tokens.weight.requires_grad

    q = model.layers[0].self_attn.q_proj
    factors = q.parametrizations.weight
    B, A, values, support = factors.original0, factors.original1, factors.original2, factors[0].indices
    assert (B.shape, A.shape) == ((64, 8), (8, 64)) and not B.any()  # the paper's start: B = 0
    assert support.dtype == torch.int32 and len(support) == len(values) == round(0.1 * 64 * 64)
    assert len(support.unique()) == len(support)  # indices, not a dense mask
    with torch.no_grad():
        B.normal_()
        expected = 16 / 8 * B @ A
        expected.view(-1)[support.long()] += values
    torch.testing.assert_close(q.weight, expected)

    ratio = body_params(model) / body_params(dense)
    assert ratio < 0.4 and model.num_params() < dense.num_params()


def test_support_and_start_are_deterministic_from_the_seed():
    a, b, c = sltrain_model(seed=1), sltrain_model(seed=1), sltrain_model(seed=2)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    key = "layers.1.mlp.down_proj.parametrizations.weight.0.indices"
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_bad_rank_density_and_starting_points_are_named():
    with pytest.raises(TokenmillError, match=r"train.optimizer.rank=40 exceeds the 32×64 weight of "
                                             r"layers.0.self_attn.k_proj: use at most 32"):
        sltrain_model(rank=40)
    with pytest.raises(TokenmillError, match=r"train.optimizer.density=1e-05 keeps no entry of the 64×64 weight"):
        sltrain_model(density=1e-5)
    for density in (0, 1.5):
        with pytest.raises(ValidationError, match="density"):
            SLTrainConfig(density=density)
    with pytest.raises(TokenmillError, match="model.init_from=/some/hf"):
        apply_sltrain(Llama(model_cfg()), SLTrainConfig(), model_cfg(init_from="/some/hf"), 0)


def test_sltrain_learns_and_exports_dense_weights_transformers_loads(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = loop.train(model_cfg(), train_cfg(max_steps=30, optimizer=SETTINGS), tokens, tmp_path / "run",
                         progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    dense = Llama(model_cfg()).num_params()
    assert summary["params"] < 0.9 * dense  # the tiny model is mostly embeddings; the blocks shrink 3x

    model = sltrain_model()
    load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"), model)
    assert model.layers[0].mlp.up_proj.parametrizations.weight.original0.any()  # B trained away from 0
    out = export_hf(model.eval(), model.cfg, tokens.parent / "tokenizer", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_resume_after_crash_is_bit_identical(tokens, tmp_path, monkeypatch):
    cfg = train_cfg(max_steps=12, ckpt_every=6, log_every=1, optimizer=SETTINGS)
    loop.train(model_cfg(), cfg, tokens, tmp_path / "straight", progress=False)
    train_killed(cfg, tokens, tmp_path / "resumed", monkeypatch, die_in_step=9)  # after the step-6 checkpoint
    loop.train(model_cfg(), cfg, tokens, tmp_path / "resumed", progress=False)

    models = [sltrain_model(seed=99) for _ in range(2)]  # another seed: the checkpoint restores the support
    for model, run in zip(models, ("straight", "resumed")):
        load_checkpoint(latest_checkpoint(tmp_path / run / "checkpoints"), model)
    for name, tensor in models[0].state_dict().items():
        assert torch.equal(tensor, models[1].state_dict()[name]), name
    assert torch.equal(models[0].layers[0].self_attn.q_proj.parametrizations.weight[0].indices,
                       sltrain_model(seed=0).layers[0].self_attn.q_proj.parametrizations.weight[0].indices)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in straight]


@pytest.mark.parametrize("optimizer, message", [
    ({"name": "sltrain", "rank": 33}, "rank=33 is larger than the smallest block matrix allows"),
    ({"name": "sltrain", "rank": 8, "density": 1e-6}, "density=1e-06 leaves no sparse entry"),
])
def test_validate_refuses_sltrain_settings_the_model_cannot_hold(optimizer, message):
    from test_run import TINY
    from tokenmill.recipe import parse_recipe

    recipe = {**TINY, "train": {**TINY["train"], "optimizer": optimizer}}  # k/v projections are 32×32
    with pytest.raises(TokenmillError, match=message):
        parse_recipe(recipe)
