"""Scaling laws from a handful of runs: how loss falls with parameters N and training tokens D.

Two laws: ``L(N, D) = E + A/N^α + B/D^β`` (Hoffmann et al. 2022) when runs vary both size and tokens,
and ``L(D) = E + B/D^β`` when one model size saw different amounts (or selections) of data. They are
fitted as Chinchilla's approach 3: with ``A = exp(a)`` and so on, ``log L`` is a log-sum-exp of
``[e, a − α log N, b − β log D]``, and the Huber loss (δ = 1e-3) of its residuals against the observed
``log L`` is minimised by L-BFGS; Huber rather than squares so that one diverged run does not drag the
fit. Starts come from Hoffmann et al.'s grid, scored in one vectorised pass: L-BFGS runs from its best
point for each combination of exponents, a few dozen runs instead of thousands. Bootstrap intervals come
from resampling the runs and refitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from tokenmill import TokenmillError

HUBER_DELTA = 1e-3
BOOTSTRAP_STARTS = 3  # refit each bootstrap resample from the full fit's best few optima
# Per law: the constants' names and, per power-law term, (log-coefficient index, exponent index, variable).
_LAWS = {
    "chinchilla": (("E", "A", "alpha", "B", "beta"), ((1, 2, "N"), (3, 4, "D"))),
    "data": (("E", "B", "beta"), ((1, 2, "D"),)),
}
# Hoffmann et al.'s initialisation grid, per parameter kind (in the log-space parametrisation).
_GRID = {"E": np.arange(-1.0, 1.01, 0.5), "coef": np.arange(0.0, 25.1, 5.0), "exponent": np.arange(0.0, 2.01, 0.5)}


@dataclass(frozen=True)
class ScalingFit:
    """A fitted law: its constants, bootstrap intervals for them, and how well it fits."""

    law: str
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    confidence: float
    n_points: int
    huber_loss: float


def fit_chinchilla(points: Sequence[tuple[float, float, float]], *, n_bootstrap: int = 200,
                   confidence: float = 0.95, seed: int = 0) -> ScalingFit:
    """Fit ``L = E + A/N^α + B/D^β`` to ``(N params, D tokens, loss)`` runs, with bootstrap intervals."""
    return _fit_law("chinchilla", points, n_bootstrap, confidence, seed)


def fit_data_law(points: Sequence[tuple[float, float, float]], *, n_bootstrap: int = 200,
                 confidence: float = 0.95, seed: int = 0) -> ScalingFit:
    """Fit ``L = E + B/D^β`` to ``(N params, D tokens, loss)`` runs (N is ignored), with bootstrap intervals."""
    return _fit_law("data", points, n_bootstrap, confidence, seed)


def predict(fit: ScalingFit, N: float | np.ndarray | None, D: float | np.ndarray) -> float | np.ndarray:
    """Loss the fitted law predicts at ``N`` parameters and ``D`` tokens (``N`` unused by the data law)."""
    p = fit.params
    loss = p["E"] + p["B"] / np.asarray(D, dtype=np.float64) ** p["beta"]
    if fit.law == "chinchilla":
        if N is None:
            raise TokenmillError("predict: the chinchilla law needs N (parameters) as well as D (tokens)")
        loss = loss + p["A"] / np.asarray(N, dtype=np.float64) ** p["alpha"]
    return float(loss) if np.ndim(loss) == 0 else loss


def _fit_law(law: str, points, n_bootstrap: int, confidence: float, seed: int) -> ScalingFit:
    names, _ = _LAWS[law]
    data = _check_points(law, points, len(names))
    if not 0 < confidence < 1:
        raise TokenmillError(f"scaling fit: confidence must be in (0, 1), got {confidence}")
    solutions = _minimise(law, data, _grid_starts(law, data))
    # A resample is close to the full data, so its optimum lies near one of the full fit's best basins.
    basins = np.array([theta for theta, _ in solutions[:BOOTSTRAP_STARTS]])
    rng = np.random.default_rng(seed)
    resampled = [_minimise(law, data[rng.integers(0, len(data), len(data))], basins)[0][0]
                 for _ in range(n_bootstrap)]
    intervals = {}
    if resampled:
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile([_natural(law, t) for t in resampled], [tail, 100 - tail], axis=0)
        intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip(names, low, high)}
    theta, loss = solutions[0]
    return ScalingFit(law, dict(zip(names, map(float, _natural(law, theta)))), intervals, confidence,
                      len(data), float(loss))


def _check_points(law: str, points, n_params: int) -> np.ndarray:
    """``[n, 3]`` array of log N, log D, log loss, after checking there is enough sound data to fit."""
    data = np.asarray(points, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 3:
        raise TokenmillError(f"scaling fit ({law}): points must be (N params, D tokens, loss) triples, "
                             f"got an array of shape {data.shape}")
    if len(data) < n_params + 1:
        raise TokenmillError(f"scaling fit ({law}): {n_params} constants need at least {n_params + 1} runs, "
                             f"got {len(data)}; add runs or fit the simpler law")
    bad = np.flatnonzero(~np.all(np.isfinite(data) & (data > 0), axis=1))
    if bad.size:
        raise TokenmillError(f"scaling fit ({law}): point #{bad[0]} {tuple(data[bad[0]])} is not positive and "
                             f"finite; N, D and loss must all be > 0")
    varying = ("N", "D") if law == "chinchilla" else ("D",)
    for column, name in ((0, "N"), (1, "D")):
        if name in varying and len(np.unique(data[:, column])) < 2:
            advice = "vary N, or fit L(D) alone with fit_data_law" if name == "N" else "vary D"
            raise TokenmillError(f"scaling fit ({law}): every run has the same {name}, so its term cannot be "
                                 f"fitted; {advice}")
    return np.log(data)


def _grid_starts(law: str, data: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s grid, reduced to its best point for each combination of exponents: the
    exponents decide the basin L-BFGS falls into, the other constants follow quickly."""
    names, _ = _LAWS[law]
    kinds = ["E" if n == "E" else "exponent" if n in ("alpha", "beta") else "coef" for n in names]
    grid = np.array(list(product(*(_GRID[k] for k in kinds))))
    exponents = [i for i, k in enumerate(kinds) if k == "exponent"]
    _, combination = np.unique(grid[:, exponents], axis=0, return_inverse=True)
    objective = _objective(law, grid, data)
    order = np.lexsort((objective, combination))  # by combination, best objective first within each
    first_of_each = order[np.r_[True, np.diff(combination[order]) != 0]]
    return grid[first_of_each]


def _minimise(law: str, data: np.ndarray, starts: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """``(θ, Huber loss)`` of an L-BFGS run from each start, best first."""
    results = [minimize(_objective_and_gradient, start, args=(law, data), jac=True, method="L-BFGS-B")
               for start in starts]
    return sorted(((r.x, float(r.fun)) for r in results), key=lambda item: item[1])


def _log_terms(law: str, theta: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``[..., n_points, 1 + n_terms]``: log of each summand of the law, for θ of shape ``[..., n_params]``."""
    _, terms = _LAWS[law]
    columns = {"N": data[:, 0], "D": data[:, 1]}
    pieces = [np.broadcast_to(theta[..., :1], theta.shape[:-1] + (len(data),))]
    pieces += [theta[..., c, None] - theta[..., g, None] * columns[x] for c, g, x in terms]
    return np.stack(pieces, axis=-1)


def _huber(r: np.ndarray) -> np.ndarray:
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _objective(law: str, theta: np.ndarray, data: np.ndarray) -> np.ndarray:
    residual = logsumexp(_log_terms(law, theta, data), axis=-1) - data[:, 2]
    return _huber(residual).sum(axis=-1)


def _objective_and_gradient(theta: np.ndarray, law: str, data: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss and its gradient: d logsumexp / d term is the term's softmax weight."""
    log_terms = _log_terms(law, theta, data)
    residual = logsumexp(log_terms, axis=-1) - data[:, 2]
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # Huber'(r)
    weights = softmax(log_terms, axis=-1) * slope[:, None]
    gradient = np.zeros_like(theta)
    gradient[0] = weights[:, 0].sum()
    columns = {"N": data[:, 0], "D": data[:, 1]}
    for t, (c, g, x) in enumerate(_LAWS[law][1], start=1):
        gradient[c] = weights[:, t].sum()
        gradient[g] = -(weights[:, t] * columns[x]).sum()
    return float(_huber(residual).sum()), gradient


def _natural(law: str, theta: np.ndarray) -> np.ndarray:
    """θ in the log-space parametrisation → (E, A, α, B, β) or (E, B, β)."""
    names, _ = _LAWS[law]
    return np.array([np.exp(v) if n in ("E", "A", "B") else v for n, v in zip(names, theta)])
