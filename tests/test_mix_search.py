"""`tokenmill mix search`: the pure algorithm on a synthetic problem with a known optimum, a tiny search
of the demo corpus end to end (resumed, its answer loaded back as a recipe), and compare charging its
proxy compute."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.cli import DEMO_RECIPE, main
from tokenmill.evaluate.compare import compare_runs
from tokenmill.recipe import load_recipe
from tokenmill.runfolder import read_mix_search_cost
from tokenmill.select.mixture_search import (MIN_DISTANCE, MixSearchConfig, best_mixture, choose_next_round,
                                             first_round, fit_regressor, predict, sample_candidates, spearman_rho)

from conftest import DEMO_DATA
from test_compare import fake_run

NATURAL = np.array([0.5, 0.3, 0.2])
OPTIMUM = np.array([0.15, 0.55, 0.30])
CURVATURE = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 4.0]])


def quadratic_target(weights: np.ndarray) -> np.ndarray:
    """A stand-in for held-out bits per byte: smallest (1.0) at OPTIMUM, far from the natural mixture."""
    d = np.atleast_2d(weights) - OPTIMUM
    return 1.0 + np.einsum("ni,ij,nj->n", d, CURVATURE, d)


# ---- the algorithm ---------------------------------------------------------------------------------------

def test_candidates_lie_on_the_simplex_above_the_floor_and_repeat_by_seed():
    w = sample_candidates(NATURAL, 500, concentration=3.0, min_weight=0.02, seed=7)
    assert w.shape == (500, 3)
    assert np.allclose(w.sum(axis=1), 1) and w.min() >= 0.02 - 1e-12
    assert np.array_equal(w, sample_candidates(NATURAL, 500, concentration=3.0, min_weight=0.02, seed=7))
    assert not np.allclose(w, sample_candidates(NATURAL, 500, concentration=3.0, min_weight=0.02, seed=8))
    assert np.allclose(w.mean(axis=0), NATURAL, atol=0.05)  # a Dirichlet around the natural mixture
    with pytest.raises(TokenmillError, match="too high for 3 domains"):
        sample_candidates(NATURAL, 5, concentration=1.0, min_weight=0.4)
    plan = first_round(NATURAL, MixSearchConfig())
    assert [p.kind for p in plan[:2]] == ["natural", "uniform"] and len(plan) == 24
    assert [p.kind for p in plan].count("heldout") == 6 and plan[-1].kind == "heldout"
    assert np.array_equal(plan[0].weights, NATURAL) and np.allclose(plan[1].weights, 1 / 3)


def test_regressor_ranks_heldout_mixtures_and_the_search_lands_near_the_optimum():
    cfg = MixSearchConfig(proxies=48, proxies_per_round=8, candidates=5000, top_k=50)
    plan = first_round(NATURAL, cfg)
    x = np.array([p.weights for p in plan])
    y = quadratic_target(x)
    held = np.array([p.kind == "heldout" for p in plan])
    model = fit_regressor(x[~held], y[~held], "lightgbm", cfg.seed)
    assert spearman_rho(predict(model, x[held]), y[held]) > 0.8

    chosen = choose_next_round(fit_regressor(x, y, seed=cfg.seed), NATURAL, x, cfg, 1)
    assert [p.kind for p in chosen] == ["top"] * 6 + ["diverse"] * 2
    for i, p in enumerate(chosen):  # never a proxy spent on a mixture already measured or chosen
        others = np.vstack([x, *(q.weights for q in chosen[:i])])
        assert np.abs(others - p.weights).sum(axis=1).min() >= MIN_DISTANCE
        assert p.predicted is not None and np.isclose(p.weights.sum(), 1)
    x = np.vstack([x, [p.weights for p in chosen]])
    y = quadratic_target(x)
    best, predicted = best_mixture(fit_regressor(x, y, seed=cfg.seed), NATURAL, cfg)
    assert np.isclose(best.sum(), 1) and np.abs(best - OPTIMUM).sum() < 0.2
    assert quadratic_target(best)[0] - 1.0 < 0.1 * (quadratic_target(NATURAL)[0] - 1.0)
    assert abs(predicted - quadratic_target(best)[0]) < 0.05
    again, _ = best_mixture(fit_regressor(x, y, seed=cfg.seed), NATURAL, cfg)
    assert np.array_equal(best, again)  # deterministic given the seed


def test_linear_regressor_recovers_a_linear_target_and_rho_needs_three_points():
    x = sample_candidates(NATURAL, 20, concentration=3.0, seed=1)
    y = x @ np.array([1.0, 2.0, 3.0])
    assert np.allclose(predict(fit_regressor(x, y, "linear"), x), y)
    assert spearman_rho([1.0, 2.0], [1.0, 2.0]) is None
    assert spearman_rho([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # a constant prediction ranks nothing
    assert spearman_rho([1.0, 2.0, 3.0], [2.0, 3.0, 9.0]) == pytest.approx(1.0)


def test_settings_that_cannot_work_are_refused_with_their_field():
    with pytest.raises(ValidationError, match="greater than or equal to 4"):
        MixSearchConfig(proxies=3)
    with pytest.raises(ValidationError, match="fewer than 3 to fit"):
        MixSearchConfig(proxies=4, heldout_fraction=0.5)
    with pytest.raises(TokenmillError, match="mix_search.proxies"):
        load_recipe(DEMO_RECIPE, ["mix_search.proxies=2"])


# ---- end to end on the demo corpus ---------------------------------------------------------------------

TINY = ["tokenizer.vocab_size=512", "model={dim: 32, n_layers: 1, n_heads: 2, max_seq_len: 64}",
        "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_tokens=256", "train.max_steps=20",
        "train.warmup_steps=2", "eval={max_docs_per_domain: 1, batch_size: 8}", "curate.workers=2",
        "mix_search={proxies: 4, rounds: 2, proxies_per_round: 2, proxy_steps: 5, candidates: 1000, top_k: 20, "
        "proxy_model: {dim: 32, n_layers: 1, n_heads: 2}}"]


def _search(out: Path, *extra: str) -> int:
    args = [a for s in (*TINY, *extra) for a in ("--set", s)]
    return main(["mix", "search", str(DEMO_RECIPE), "--out", str(out), "--no-progress", *args])


def test_search_writes_its_answer_resumes_without_training_and_checks_its_target(tmp_path, capsys):
    out = tmp_path / "mix"
    assert _search(out) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "search.json").read_text())
    rows = result["proxies"]
    assert [r["proxy"] for r in rows] == [f"p{i:03d}" for i in range(6)]
    assert [r["kind"] for r in rows] == ["natural", "uniform", "sampled", "heldout", "top", "diverse"]
    assert [r["round"] for r in rows] == [1, 1, 1, 1, 2, 2]
    for r in rows:
        assert set(r["bpb"]) == {"bible", "python_docs", "shakespeare"} and r["tokens"] == 5 * 256
        assert r["target"] == pytest.approx(np.mean(list(r["bpb"].values()))) and r["flops"] > 0
        assert (out / "proxies" / r["proxy"] / "result.json").is_file()
        assert not (out / "proxies" / r["proxy"] / "train" / "checkpoints").exists()
    assert rows[3]["predicted"] is not None  # the held-out proxy, predicted by the fit that left it out
    assert result["heldout"] == {"proxies": ["p003"], "spearman_rho": None}
    assert "held-out Spearman rho: not measured" in printed
    assert result["cost"]["flops"] == pytest.approx(sum(r["flops"] for r in rows))
    cost = read_mix_search_cost(out)
    assert cost.flops == result["cost"]["flops"] and cost.seconds == result["cost"]["seconds"]
    weights = result["best"]["weights"]
    assert sum(weights.values()) == pytest.approx(1, abs=1e-3)
    assert len((out / "proxies.csv").read_text().splitlines()) == 7
    assert "p005" in printed and result["best"]["set"] in printed

    fragment = yaml.safe_load((out / "best_mixture.yaml").read_text())
    mixture = {"phases": [{"until": 1.0, "weights": weights}], "searched": str(out.resolve())}
    assert fragment == {"train": {"mixture": mixture}}
    flag, override = shlex.split(result["best"]["set"])
    assert flag == "--set"
    train = load_recipe(DEMO_RECIPE, [override]).train
    assert train.mixture.phases[0].weights == weights and train.mixture.searched == str(out.resolve())

    before = {r["proxy"]: (out / "proxies" / r["proxy"] / "result.json").stat().st_mtime_ns for r in rows}
    assert _search(out) == 0
    printed = capsys.readouterr().out
    assert "round 1/2: 0 proxies to train, 4 reused" in printed and "round 2/2: 0 proxies to train, 2 reused" in printed
    again = json.loads((out / "search.json").read_text())
    assert all(r["reused"] for r in again["proxies"]) and again["best"] == result["best"]
    assert before == {p: (out / "proxies" / p / "result.json").stat().st_mtime_ns for p in before}

    assert _search(out, "mix_search.target.domains=[bible, poetry]") == 2
    assert "['poetry'] not in the corpus's held-out documents" in capsys.readouterr().err


def test_a_corpus_of_one_domain_has_nothing_to_mix(tmp_path, capsys):
    one = f"sources=[{{path: {DEMO_DATA / 'bible.jsonl.gz'}, domain: bible}}]"
    assert _search(tmp_path / "mix", one, "curate.steps=[]") == 2
    assert "needs 2 or more domains" in capsys.readouterr().err


# ---- compare charges the search ---------------------------------------------------------------------------

def test_compare_charges_the_mixture_search_a_run_names(tmp_path, capsys):
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.json").write_text(json.dumps({"cost": {"flops": 3e8, "seconds": 12.5}}))
    plain = fake_run(tmp_path / "plain", evals=[1024, 2048, 4096])
    mixed = fake_run(tmp_path / "mixed", evals=[1024, 2048, 4096])
    recipe = yaml.safe_load((mixed / "recipe.yaml").read_text())
    recipe["train"]["mixture"] = {"phases": [{"until": 1.0, "weights": {"bible": 0.7, "code": 0.3}}],
                                  "searched": str(search)}
    (mixed / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = compare_runs([plain, mixed])
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["plain"]["mix_search_flops"] == 0 and runs["plain"]["mix_search_seconds"] is None
    assert runs["mixed"]["mix_search_flops"] == 3e8 and runs["mixed"]["mix_search_seconds"] == 12.5
    assert runs["mixed"]["flops"] == pytest.approx(3e8 + runs["mixed"]["flops_per_token"] * 4096)
    assert result["equal_compute"]["flops"] == pytest.approx(runs["plain"]["flops"])  # the search made mixed dearer
    assert main(["compare", str(plain), str(mixed), "--out", str(tmp_path / "cmp")]) == 0
    assert "mixture-search FLOPs" in capsys.readouterr().out

    (search / "search.json").unlink()
    with pytest.raises(TokenmillError, match="train.mixture.searched"):
        compare_runs([plain, mixed])
