"""Scaling-law fits recover known constants, extrapolate, resist an outlier, and refuse unfit data."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill import TokenmillError
from tokenmill.evaluate.scaling import fit_chinchilla, fit_data_law, predict

# Hoffmann et al. 2022's fitted constants: a realistic law to generate runs from.
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / np.asarray(N) ** TRUE["alpha"] + TRUE["B"] / np.asarray(D) ** TRUE["beta"]


def runs(noise: float, seed: int = 0, fixed_n: float | None = None) -> list[tuple[float, float, float]]:
    """A 5 × 5 sweep of model sizes and token counts with multiplicative log-normal noise on the loss."""
    rng = np.random.default_rng(seed)
    sizes = [fixed_n] if fixed_n else np.geomspace(1e7, 3e8, 5)
    tokens = np.geomspace(2e8, 1e10, 5 if fixed_n is None else 8)
    return [(N, D, float(true_loss(N, D) * np.exp(rng.normal(0, noise)))) for N in sizes for D in tokens]


def test_chinchilla_fit_recovers_constants_and_extrapolates():
    fit = fit_chinchilla(runs(noise=0.003), n_bootstrap=20)

    assert fit.law == "chinchilla" and fit.n_points == 25
    assert fit.params["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert fit.params["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    assert fit.params["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert fit.params["A"] == pytest.approx(TRUE["A"], rel=0.5)
    assert fit.params["B"] == pytest.approx(TRUE["B"], rel=0.5)
    # a held-back run 3× larger and with 2× more tokens than any fitted one
    assert predict(fit, 1e9, 2e10) == pytest.approx(true_loss(1e9, 2e10), rel=0.02)
    assert set(fit.intervals) == set(TRUE)
    assert all(low <= high for low, high in fit.intervals.values())


def test_data_law_fits_one_model_size():
    N = 1e8
    fit = fit_data_law(runs(noise=0.003, fixed_n=N), n_bootstrap=20)

    assert set(fit.params) == {"E", "B", "beta"}
    # at one size the size term is part of the irreducible loss
    assert fit.params["E"] == pytest.approx(TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"], rel=0.05)
    assert fit.params["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert predict(fit, None, 3e10) == pytest.approx(true_loss(N, 3e10), rel=0.02)


def test_bootstrap_intervals_widen_with_noise():
    def width(noise: float) -> float:
        low, high = fit_data_law(runs(noise, fixed_n=1e8), n_bootstrap=30).intervals["beta"]
        return high - low

    assert width(0.02) > 3 * width(0.001)


def test_one_outlier_run_barely_moves_the_fit():
    points = runs(noise=0.002)
    points[7] = (points[7][0], points[7][1], points[7][2] * 1.3)  # a diverged run
    fit = fit_chinchilla(points, n_bootstrap=0)
    assert fit.intervals == {}
    assert predict(fit, 1e9, 2e10) == pytest.approx(true_loss(1e9, 2e10), rel=0.02)


def test_refuses_data_that_cannot_determine_the_law():
    points = runs(noise=0.0)
    with pytest.raises(TokenmillError, match="at least 6 runs"):
        fit_chinchilla(points[:5])
    with pytest.raises(TokenmillError, match="at least 4 runs"):
        fit_data_law(points[:3])
    with pytest.raises(TokenmillError, match="same N"):
        fit_chinchilla(runs(noise=0.0, fixed_n=1e8))
    with pytest.raises(TokenmillError, match="point #2"):
        fit_chinchilla([*points[:2], (1e7, 1e9, -1.0), *points[3:]])
    with pytest.raises(TokenmillError, match="triples"):
        fit_data_law([(1e9, 2.0)] * 6)
