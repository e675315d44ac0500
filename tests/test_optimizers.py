"""``train.optimizer``: AdamW (default), Muon and GaLore train the tiny model and resume bit-identically;
our Muon is torch's op for op in one process; GaLore keeps less state; bad settings fail validation
naming the field; Muon and GaLore take FSDP2-sharded weights (2 processes: test_fsdp_optimizers.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tokenmill import TokenmillError
from tokenmill.model import Llama
from tokenmill.recipe import parse_recipe
from tokenmill.train import loop
from tokenmill.train.checkpoint import load_trained_model
from tokenmill.train.config import AdamWConfig, SLTrainConfig
from tokenmill.train.galore import GaLoreAdamW
from tokenmill.train.muon import Muon
from tokenmill.train.optim import Combined, build_adamw, build_optimizer

from test_train import SEQ, model_cfg, read_metrics, tokens, train_cfg, train_killed  # noqa: F401  (tokens: a fixture)

CPU = torch.device("cpu")
OPTIMIZERS = {
    "adamw": {"name": "adamw"},
    "muon": {"name": "muon"},
    # a projection refreshed at steps 1, 5, 9, 13, 17: the resumed run (from step 10) starts on a restored one
    "galore": {"name": "galore", "rank": 8, "update_proj_gap": 4},
    "galore_per_layer": {"name": "galore", "rank": 8, "update_proj_gap": 4, "per_layer_update": True},
}


# ---- settings ------------------------------------------------------------------------------------


def test_settings_default_to_adamw_and_the_papers_values():
    assert train_cfg().optimizer == AdamWConfig()
    muon = train_cfg(optimizer={"name": "muon"}).optimizer
    assert (muon.momentum, muon.nesterov, muon.ns_steps, muon.adjust_lr_fn) == (0.95, True, 5, "match_rms_adamw")
    galore = train_cfg(optimizer={"name": "galore"}).optimizer
    assert (galore.rank, galore.update_proj_gap, galore.scale, galore.proj_type) == (128, 200, 0.25, "std")
    sltrain = train_cfg(optimizer={"name": "sltrain"}).optimizer
    assert sltrain == SLTrainConfig() and (sltrain.rank, sltrain.density, sltrain.alpha) == (128, 0.03, 32)
    assert train_cfg(optimizer={"name": "galore", "rank": 4}).model_dump(mode="json")["optimizer"] == {
        "name": "galore", "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
        "per_layer_update": False}


@pytest.mark.parametrize("optimizer, field", [
    ({"name": "galore", "rank": 0}, "optimizer.galore.rank"),
    ({"name": "galore", "update_proj_gap": 0}, "optimizer.galore.update_proj_gap"),
    ({"name": "galore", "rank": "many"}, "optimizer.galore.rank"),
    ({"name": "galore", "proj_type": "both"}, "optimizer.galore.proj_type"),
    ({"name": "muon", "momentum": 1.0}, "optimizer.muon.momentum"),
    ({"name": "muon", "ns_steps": "five"}, "optimizer.muon.ns_steps"),
    ({"name": "muon", "adjust_lr_fn": "none"}, "optimizer.muon.adjust_lr_fn"),
    ({"name": "sltrain", "rank": -1}, "optimizer.sltrain.rank"),
    ({"name": "sltrain", "density": 0}, "optimizer.sltrain.density"),
    ({"name": "sltrain", "density": 1.5}, "optimizer.sltrain.density"),
    ({"name": "adamw", "rank": 8}, "optimizer.adamw.rank"),
    ({"name": "sgd"}, "optimizer"),
])
def test_bad_settings_fail_validation_naming_the_field(optimizer, field):
    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n"):
        train_cfg(optimizer=optimizer)
    recipe = {"name": "r", "sources": [{"path": "docs.parquet"}], "train": {"optimizer": optimizer}}
    with pytest.raises(TokenmillError, match=rf"(?m)^  train\.{field}: "):
        parse_recipe(recipe)


# ---- what each optimizer updates -----------------------------------------------------------------


def test_adamw_by_name_is_the_plain_adamw():
    model = Llama(model_cfg())
    built, plain = build_optimizer(model, train_cfg(), CPU), build_adamw(model, train_cfg(), CPU)
    assert type(built) is torch.optim.AdamW
    assert [g["params"] for g in built.param_groups] == [g["params"] for g in plain.param_groups]


@pytest.mark.parametrize("name, kind", [("muon", Muon), ("galore", GaLoreAdamW)])
def test_block_matrices_get_the_named_optimizer_and_the_rest_adamw(name, kind):
    model = Llama(model_cfg(tie_embeddings=True))
    optimizer = build_optimizer(model, train_cfg(optimizer={"name": name}), CPU)
    assert isinstance(optimizer, Combined)
    adamw, matrices = optimizer
    assert type(adamw) is torch.optim.AdamW and type(matrices) is kind
    block = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    assert {id(p) for g in matrices.param_groups for p in g["params"]} == block
    rest = [p for g in adamw.param_groups for p in g["params"]]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - block  # embedding (tied head), norms
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    for group in optimizer.param_groups:  # the loop's schedule sets lr on each
        group["lr"] = 0.01
    assert all(g["lr"] == 0.01 for opt in optimizer for g in opt.param_groups)
    before = copy.deepcopy(model)
    batch = torch.randint(0, 300, (2, 16))
    model(batch, batch)[1].backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for (key, old), new in zip(before.named_parameters(), model.parameters()):
        assert not torch.equal(old, new), key


def _state_elements(optimizer, params) -> int:
    return sum(t.numel() for p in params for t in optimizer.state[p].values() if t.dim() > 0)


def test_galore_state_is_rank_over_the_short_side_of_adamws_on_block_weights():
    rank = 8
    model = Llama(model_cfg())
    batch = torch.randint(0, 300, (2, 16))
    sizes = {}
    for name, settings in [("adamw", {"name": "adamw"}), ("galore", {"name": "galore", "rank": rank})]:
        trained = copy.deepcopy(model)
        optimizer = build_optimizer(trained, train_cfg(optimizer=settings), CPU)
        trained(batch, batch)[1].backward()
        optimizer.step()
        blocks = [p for p in trained.layers.parameters() if p.dim() == 2]
        sizes[name] = (_state_elements(optimizer, blocks), _state_elements(optimizer, list(trained.parameters())))
        if name == "galore":
            galore = optimizer.optimizers[1]
            for p in blocks:  # Adam moments max(m, n)×r instead of m×n, plus the min(m, n)×r projector
                m, n = p.shape
                state = galore.state[p]
                assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == max(m, n) * rank
                assert state["projector"].numel() == min(m, n) * rank
    (adamw_blocks, adamw_total), (galore_blocks, galore_total) = sizes["adamw"], sizes["galore"]
    expected = sum(2 * max(p.shape) * rank + min(p.shape) * rank for p in model.layers.parameters() if p.dim() == 2)
    assert galore_blocks == expected and adamw_blocks == sum(2 * p.numel() for p in model.layers.parameters()
                                                             if p.dim() == 2)
    assert galore_blocks < 0.4 * adamw_blocks  # rank 8 of the tiny model's 32- and 64-wide sides, plus projectors
    assert adamw_total - galore_total == adamw_blocks - galore_blocks


def test_our_muon_is_torchs_muon_bit_for_bit():
    """In one process nothing is gathered and the step is torch.optim.Muon's, op for op: runs and
    checkpoints from before FSDP2 support continue unchanged."""
    torch.manual_seed(0)
    for adjust_lr_fn in (None, "original", "match_rms_adamw"):
        for nesterov in (True, False):
            ours = [torch.randn(shape) for shape in [(5, 3), (3, 7), (4, 4)]]  # tall, wide, square
            theirs = [p.clone() for p in ours]
            settings = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
            ours_opt, theirs_opt = Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
            for _ in range(3):
                for a, b in zip(ours, theirs):
                    a.grad = torch.randn_like(a)
                    b.grad = a.grad.clone()
                ours_opt.step()
                theirs_opt.step()
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b), (adjust_lr_fn, nesterov, tuple(a.shape))
                assert torch.equal(ours_opt.state[a]["momentum_buffer"], theirs_opt.state[b]["momentum_buffer"])


@pytest.mark.parametrize("name", ["muon", "galore"])
def test_muon_and_galore_step_fsdp2_sharded_weights_as_whole_ones(name, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Llama(model_cfg())
        sharded = copy.deepcopy(model)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        cfg = train_cfg(optimizer=OPTIMIZERS[name])
        batch = torch.randint(0, 300, (2, 16))
        for trained in (model, sharded):
            optimizer = build_optimizer(trained, cfg, CPU)
            for _ in range(2):
                trained(batch, batch)[1].backward()
                optimizer.step()
                optimizer.zero_grad()
        for (key, whole), part in zip(model.named_parameters(), sharded.parameters()):
            assert isinstance(part, DTensor)
            torch.testing.assert_close(part.full_tensor(), whole, rtol=1e-6, atol=1e-6, msg=key)
    finally:
        dist.destroy_process_group()


# ---- training and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_learns_and_resumes_bit_identically(name, tokens, tmp_path, monkeypatch):  # noqa: F811
    per_layer = {"grad_clip": 0.0, "global_batch_tokens": 4 * SEQ} if name == "galore_per_layer" else {}
    cfg = train_cfg(max_steps=20, ckpt_every=10, log_every=1, optimizer=OPTIMIZERS[name], **per_layer)
    loop.train(model_cfg(), cfg, tokens, tmp_path / "straight", progress=False)
    straight = read_metrics(tmp_path / "straight")
    losses = [r["loss"] for r in straight if "loss" in r]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])

    train_killed(cfg, tokens, tmp_path / "resumed", monkeypatch, die_in_step=14)  # after the step-10 checkpoint
    loop.train(model_cfg(), cfg, tokens, tmp_path / "resumed", progress=False)

    resumed = read_metrics(tmp_path / "resumed")
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == \
        [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in straight]
    weights = [load_trained_model(tmp_path / run / "checkpoints")[0].state_dict() for run in ("straight", "resumed")]
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][key]), key


def test_per_layer_updates_are_the_same_steps_with_no_gradients_left(tokens, tmp_path):  # noqa: F811
    """GaLore stepped parameter by parameter inside backward trains exactly as the whole-model step (without
    clipping), and no gradient outlives its backward pass."""
    settings = {"name": "galore", "rank": 8, "update_proj_gap": 4}
    runs = {}
    for per_layer in (False, True):
        cfg = train_cfg(max_steps=6, log_every=1, grad_clip=0.0, global_batch_tokens=4 * SEQ,
                        optimizer={**settings, "per_layer_update": per_layer})
        summary = loop.train(model_cfg(), cfg, tokens, tmp_path / str(per_layer), progress=False)
        runs[per_layer] = ([(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / str(per_layer)) if "loss" in r],
                           summary["memory"])
    (whole, whole_memory), (layered, layered_memory) = runs[False], runs[True]
    for (loss_a, norm_a), (loss_b, norm_b) in zip(whole, layered):
        assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    assert layered_memory["grad_bytes"] == 0 < whole_memory["grad_bytes"]
    assert layered_memory["optimizer_state_bytes"] == whole_memory["optimizer_state_bytes"]


@pytest.mark.parametrize("overrides, message", [
    ({"grad_clip": 1.0, "global_batch_tokens": 4 * SEQ}, "grad_clip: 0"),
    ({"grad_clip": 0.0, "global_batch_tokens": 8 * SEQ}, "global_batch_tokens"),
])
def test_per_layer_updates_refuse_clipping_and_accumulation(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_cfg(optimizer={"name": "galore", "per_layer_update": True}, **overrides)
