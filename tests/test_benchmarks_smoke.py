"""The optimizer, growth, mixtures and encoders benchmarks end to end at their --smoke scale (bundled demo corpus, a
few steps), and train_speed's encoder path: each prints one JSON line on stdout with the keys its README row
promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DATA

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(script: str, workdir: Path, *extra: str) -> dict:
    """Run the script as a user would (its folder on sys.path, one thread); stdout must be one JSON line."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", "--corpus", str(DEMO_DATA),
                           "--threads", "1", "--workdir", str(workdir), *extra],
                          capture_output=True, text=True, timeout=120, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_optimizers_smoke(tmp_path):
    result = run_smoke("optimizers.py", tmp_path)
    assert result["benchmark"] == "optimizers" and result["peer"] == "adamw"
    assert set(result["optimizers"]) == {"adamw", "muon", "galore", "sltrain"}
    for name, r in result["optimizers"].items():
        assert [row["lr"] for row in r["lr_sweep"]] == result["lr_sweep"]
        assert r["lr"] in result["lr_sweep"]
        assert r["final_bpb"]["mean"] > 0 and len(r["final_bpb"]["per_seed"]) == r["seeds"]
        assert {"param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_bytes"} <= set(r["measured"])
        assert {"param_bytes", "optimizer_state_bytes", "total_bytes"} <= set(r["predicted_350M"])
        assert {"final_bpb", "tokens_to_adamw_final", "optimizer_state_bytes", "param_bytes", "peak_bytes",
                "predicted_350M_total_bytes"} <= set(r["vs_adamw"])
        assert "tokens_to_adamw_final" in r
    assert result["optimizers"]["adamw"]["vs_adamw"]["optimizer_state_bytes"] == 1.0
    assert result["optimizers"]["adamw"]["seeds"] == result["optimizers"][result["best_non_adamw"]]["seeds"] == 2
    # fewer trained parameters, less state: the measured bytes agree with what the two methods are for
    sltrain, galore = result["optimizers"]["sltrain"]["vs_adamw"], result["optimizers"]["galore"]["vs_adamw"]
    assert sltrain["param_bytes"] < 1 and galore["optimizer_state_bytes"] < 1
    assert set(result["bars_350M"]) == {"galore", "sltrain"}


def test_growth_smoke(tmp_path):
    result = run_smoke("growth.py", tmp_path)
    assert result["benchmark"] == "growth" and result["peer"] == "scratch"
    assert result["small_layers"] * result["depth"] == result["deep_model"]["n_layers"]
    for run in ("small", "grown", "scratch"):
        assert result[run]["final_bpb"] > 0 and result[run]["curve"][-1][1] == result[run]["final_bpb"]
    assert result["grown"]["curve"][-1][0] == result["scratch"]["curve"][-1][0] == result["deep_tokens"]
    assert 0 < result["small_flops_per_deep_token_flops"] < 1
    for key in ("grown_tokens_to_scratch_final", "token_ratio", "token_ratio_with_small_flops", "bar", "met"):
        assert key in result
    # both deep runs pick their lr from the same printed sweep
    for run in ("grown", "scratch"):
        assert [row["lr"] for row in result[run]["lr_sweep"]] == result["lr_sweep"]
        assert result[run]["lr"] in result["lr_sweep"]
    assert {"small_schedule", "grown_warmup", "scratch_warmup", "lrs"} <= set(result["recipe"])


def test_mixtures_smoke(tmp_path):
    result = run_smoke("mixtures.py", tmp_path, "--seeds", "2", "--fractions", "0.5")
    assert result["benchmark"] == "mixtures" and result["peer"] == "natural"
    assert set(result["arms"]) == {"natural", "uniform", "searched_macro", "searched_pair", "doremi", "upsample_end",
                                   "meco", "related"}
    for row in result["arms"].values():
        assert row["final_macro_bpb"] > 0 and set(row["per_domain_bpb"]) == set(result["domains"])
    for name, target in (("searched_macro", "macro"), ("searched_pair", "pair")):
        weights = result["arms"][name]["weights"]
        assert sum(weights.values()) == pytest.approx(1, abs=1e-3)
        assert [tokens for tokens, _ in result["arms"][name]["complete_runs"][target]] == sorted(
            tokens for tokens, _ in result["arms"][name]["complete_runs"][target])
    assert result["search"]["proxies"] == len(result["proxies"]) >= 5 and result["search"]["proxy_flops"] > 0
    doremi = result["arms"]["doremi"]["weights"]
    assert set(doremi) == set(result["domains"]) and sum(doremi.values()) == pytest.approx(1, abs=1e-3)
    assert set(result["met"]) == {"searched_macro", "searched_pair", "rho", "upsample_end_pair_better",
                                  "upsample_end_macro_within_noise", "meco"}


def test_encoders_smoke(tmp_path):
    result = run_smoke("encoders.py", tmp_path)
    assert result["benchmark"] == "encoders" and result["peer"] == "mlm" and result["seeds"] == 2
    assert set(result["arms"]) == {"mlm", "electra"}
    for arm in result["arms"].values():
        assert {"model", "steps", "tokens", "flops_per_token", "total_flops", "probe_accuracy", "mlm_bpb", "pll_bpb",
                "final_train_loss", "seconds", "runs"} <= set(arm)
        assert 0 <= arm["probe_accuracy"]["mean"] <= 1 and arm["probe_accuracy"]["fold_std"] >= 0
        assert len(arm["probe_accuracy"]["per_seed"]) == len(arm["runs"]) == 2
        assert arm["mlm_bpb"] > 0 and arm["pll_bpb"] > 0
    # equal FLOPs: the arm cheaper per token trains proportionally more steps (within one step's rounding)
    mlm, electra = result["arms"]["mlm"], result["arms"]["electra"]
    assert abs(result["flops_ratio_electra_over_mlm"] - 1) <= max(1 / mlm["steps"], 1 / electra["steps"])
    assert (mlm["steps"] > electra["steps"]) == (mlm["flops_per_token"] < electra["flops_per_token"])
    assert {"rtd_loss", "rtd_accuracy", "all_original_accuracy"} <= set(electra["rtd_heldout"])
    assert electra["generator"]["dim"] < electra["model"]["dim"]
    probe = result["probe"]
    assert 0 < probe["majority_baseline"] < 1 and "accuracy" in probe["untrained_encoder"]
    assert result["met"] == (electra["probe_accuracy"]["mean"] >= mlm["probe_accuracy"]["mean"])
    assert "bar" in result and "equal_flops" in result


def test_train_speed_mlm_smoke():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "train_speed.py"), "--objective", "mlm", "--smoke"],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["objective"] == "mlm" and result["rounds"] == len(result["results"]["tokenmill"]["rounds"])
    assert result["results"]["hf_modernbert"]["tokens_per_s"] > 0
    assert result["tokenmill_vs_hf_modernbert"] > 0 and result["bar"] == 1.0 and "met" in result


def test_train_speed_cpu_decoder_peers_at_equal_matmul_flops():
    """The CPU decoder path: tokenmill beside HF Llama and HF GPT-2 in interleaved rounds (a short sequence
    keeps it quick); the GPT-2 peer has the same matmul FLOPs (its tied head counts once as a parameter)."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / "train_speed.py"), "--device", "cpu", "--seq", "32",
                           "--micro-batch", "2", "--vocab", "512", "--steps", "2", "--rounds", "2",
                           "--peers", "hf,hf_gpt2"],
                          capture_output=True, text=True, timeout=180, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["compile"] is False
    results = result["results"]
    assert {"tokenmill", "hf_llama", "hf_gpt2"} == set(results)
    assert all(len(r["rounds"]) == 2 and r["tokens_per_s"] > 0 for r in results.values())
    assert results["tokenmill"]["parameters"] == results["hf_llama"]["parameters"]
    head = result["shape"]["vocab"] * result["shape"]["dim"]
    # beside the matmuls GPT-2 has learned positions, biases and LayerNorm shifts: under 1% of the weights
    assert abs(results["hf_gpt2"]["parameters"] + head - results["tokenmill"]["parameters"]) < \
        0.01 * results["tokenmill"]["parameters"]
    assert result["fastest_gpt2_peer"] == "hf_gpt2"
    assert result["met"]["vs_hf_llama"] == (result["tokenmill_vs_hf_llama"] >= 1.3)
    for r in results.values():  # the profiled matmul and attention time of each step
        assert r["matmul_attention_s_per_step"] > 0 and 0 < r["share_of_step"] < 1
    assert result["ceiling_vs_hf_gpt2"] > 0
