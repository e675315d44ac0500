"""Memory accounting: bytes counted from the tensors themselves, checked against a hand count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tokenmill.model import Llama
from tokenmill.train.loop import train
from tokenmill.train.memory import measure, predict, tensor_bytes

from test_train import SEQ, model_cfg, tokens, train_cfg  # noqa: F401  (tokens is a fixture)


def test_summary_counts_params_grads_and_adamw_state_as_a_hand_count(tokens, tmp_path):  # noqa: F811
    summary = train(model_cfg(tie_embeddings=True), train_cfg(max_steps=2), tokens, tmp_path, progress=False)
    model = Llama(model_cfg(tie_embeddings=True))
    params = sum(p.numel() for p in model.parameters()) * 4  # fp32; the tied embedding once
    memory = summary["memory"]
    assert memory["param_bytes"] == params
    assert memory["grad_bytes"] == params  # every weight is trained
    assert memory["optimizer_state_bytes"] == 2 * params  # AdamW: exp_avg and exp_avg_sq
    assert memory["peak_kind"] == "cpu_peak_rss" and memory["peak_bytes"] > 4 * params


def test_shared_storage_is_counted_once():
    weight = torch.zeros(10, 10)
    assert tensor_bytes([weight, weight, weight.view(100)]) == 400
    model = torch.nn.Linear(10, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    assert measure(model, optimizer) == {"param_bytes": 440, "grad_bytes": 440, "optimizer_state_bytes": 440}


@pytest.mark.parametrize("optimizer", [{"name": "adamw"}, {"name": "muon"}, {"name": "galore", "rank": 8},
                                       {"name": "sltrain", "rank": 8, "density": 0.1}])
def test_prediction_before_allocation_matches_the_tensors_of_a_run(tokens, tmp_path, optimizer):  # noqa: F811
    cfg = train_cfg(max_steps=1, optimizer=optimizer)
    measured = train(model_cfg(), cfg, tokens, tmp_path, progress=False)["memory"]
    predicted = predict(model_cfg(), cfg)
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert predicted[key] == measured[key], key
    assert predict(model_cfg(), cfg, micro_batch=8)["activation_bytes"] == 2 * predicted["activation_bytes"]


def test_per_layer_prediction_counts_one_gradient_and_a_run_none_at_rest(tokens, tmp_path):  # noqa: F811
    cfg = train_cfg(max_steps=1, grad_clip=0.0, global_batch_tokens=4 * SEQ,
                    optimizer={"name": "galore", "rank": 8, "per_layer_update": True})
    measured = train(model_cfg(), cfg, tokens, tmp_path, progress=False)["memory"]
    predicted = predict(model_cfg(), cfg)
    assert predicted["param_bytes"] == measured["param_bytes"]
    assert predicted["optimizer_state_bytes"] == measured["optimizer_state_bytes"]
    assert measured["grad_bytes"] == 0
    assert predicted["grad_bytes"] == 4 * max(p.numel() for p in Llama(model_cfg()).parameters())


def test_sharded_prediction_divides_all_but_galores_replicated_block_state():
    """Under FSDP2 every rank keeps its share of weights, gradients and AdamW/Muon state, but the whole of
    GaLore's projected block state (train/galore.py computes it on every rank)."""
    one = {name: predict(model_cfg(), train_cfg(optimizer=opt)) for name, opt in
           (("adamw", {"name": "adamw"}), ("galore", {"name": "galore", "rank": 8}))}
    two = {name: predict(model_cfg(), train_cfg(optimizer=opt), world_size=2) for name, opt in
           (("adamw", {"name": "adamw"}), ("galore", {"name": "galore", "rank": 8}))}
    assert two["adamw"]["optimizer_state_bytes"] == one["adamw"]["optimizer_state_bytes"] // 2
    assert two["galore"]["param_bytes"] == one["galore"]["param_bytes"] // 2
    galore_half = two["galore"]["optimizer_state_bytes"]
    assert one["galore"]["optimizer_state_bytes"] // 2 < galore_half < one["galore"]["optimizer_state_bytes"]


def test_dry_run_prints_the_prediction_of_a_recipe(tmp_path, capsys):
    from tokenmill.cli import main

    recipe = Path(__file__).resolve().parents[1] / "src" / "tokenmill" / "recipes" / "demo.yaml"
    assert main(["train", str(recipe), "--dry-run", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "optimizer adamw, micro-batch 4 x 256 tokens" in out
    assert re.search(r"optimizer state\s+10\.5088", out) and re.search(r"param\s+5\.2544", out)
