"""Mixture search as regression (RegMix, Liu et al. 2024), refined in rounds (CLIMB, Diao et al. 2025).

Small proxy models train on sampled domain mixtures at one fixed token budget; a regressor learns the
held-out bits per byte they reach from their weights alone; the mixture to train on is the mean of the
``top_k`` best predicted among many sampled candidates (RegMix's answer, steadier than the single
argmin of a piecewise-constant tree model). Later rounds bootstrap as CLIMB does: sample candidates,
predict, train the best predicted ones and a few diverse ones, refit on everything measured.

This module is the pure part: sampling, fitting, choosing the next round and the answer, each
deterministic given ``seed`` and free of IO, so it is tested on synthetic problems with a known
optimum. ``tokenmill.mix_search`` trains the proxies and keeps the books.

A mixture is an array of weights over the corpus's domains in sorted order, on the simplex.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.stats import spearmanr

from tokenmill import TokenmillError

# Two mixtures closer than this in L1 distance (of 2 at most) are one experiment: a later round never
# spends a proxy within it of a mixture already chosen or measured.
MIN_DISTANCE = 0.05
# Per-domain Dirichlet concentration of the candidates later rounds draw around the predicted best:
# each weight then varies by a few points, where the prior's samples spread over the whole simplex.
LOCAL_CONCENTRATION = 10.0


class ProxyModelConfig(BaseModel):
    """The proxy decoder's shape: these fields replace the recipe model's; null keeps the recipe's."""

    model_config = ConfigDict(extra="forbid")

    dim: int | None = Field(256, gt=0, description="Hidden size of every proxy (RegMix's 1M-parameter proxies: "
                            "2 blocks of width 256).")
    n_layers: int | None = Field(2, gt=0, description="Transformer blocks of every proxy.")
    n_heads: int | None = Field(4, gt=0, description="Attention heads of every proxy (MHA; the feed-forward "
                                "width follows dim).")


class MixTarget(BaseModel):
    """What a mixture is judged by: held-out bits per byte, averaged over domains."""

    model_config = ConfigDict(extra="forbid")

    domains: list[str] | Literal["macro"] = Field(
        "macro", description="Domains whose held-out bits per byte are averaged (unweighted): the ones the "
        "model is for. 'macro': every domain, each counting the same.")


class MixSearchConfig(BaseModel):
    """``mix_search``: how ``tokenmill mix search`` looks for the domain weights to train the recipe with.
    Defaults follow RegMix and CLIMB where they give one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    proxies: int = Field(24, ge=4, description="Proxies of the first round: the natural mixture, uniform, and "
                         "Dirichlet samples around the natural one.")
    rounds: int = Field(2, ge=1, description="Rounds of proxies; each after the first refits the regressor on "
                        "everything measured and trains where it predicts the best (CLIMB's bootstrapping).")
    proxies_per_round: int = Field(8, ge=1, description="Proxies of each round after the first.")
    diverse_fraction: float = Field(0.25, ge=0, le=1, description="Share of a later round's proxies spent on "
                                    "promising mixtures far from every one measured, rather than the best "
                                    "predicted (rounded up).")
    concentration: float = Field(3.0, gt=0, description="Dirichlet concentration of the sampled mixtures: "
                                 "alpha_d = concentration · natural_d. Small values give sparse mixtures far "
                                 "from the natural one, large values mixtures close to it.")
    min_weight: float = Field(0.0, ge=0, lt=1, description="Floor under every domain's weight in a sampled "
                              "mixture (w → min_weight + (1 - K·min_weight)·w); 0 lets a mixture leave a "
                              "domain out.")
    proxy_model: ProxyModelConfig = Field(default_factory=ProxyModelConfig)
    proxy_steps: int = Field(1000, ge=1, description="Optimizer steps of every proxy; its token budget is "
                             "proxy_steps · train.global_batch_tokens, the same for every mixture.")
    target: MixTarget = Field(default_factory=MixTarget)
    regressor: Literal["auto", "lightgbm", "linear"] = Field(
        "auto", description="Weights → target model: 'lightgbm' (RegMix's gradient-boosted trees; pip install "
        "lightgbm), 'linear' (least squares on the weights, which can only favour a corner of the simplex), "
        "'auto': lightgbm if installed, else scikit-learn's HistGradientBoostingRegressor.")
    heldout_fraction: float = Field(0.25, ge=0, lt=1, description="Share of the first round's sampled proxies "
                                    "left out of the first fit, to measure how well it ranks unseen mixtures "
                                    "(Spearman rho, needs 3 or more).")
    candidates: int = Field(100_000, ge=100, description="Mixtures sampled and predicted to find the best "
                            "(RegMix: 100,000).")
    top_k: int = Field(100, ge=1, description="The answer is the mean of the top_k best predicted candidates "
                       "(RegMix: 100).")
    seed: int = Field(0, description="Seed of every sampled mixture and of the regressor.")

    @model_validator(mode="after")
    def _enough_to_fit(self) -> "MixSearchConfig":
        if heldout_count(self) > self.proxies - 3:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} of {self.proxies} proxies leaves fewer than "
                             f"3 to fit the first regressor: lower heldout_fraction or raise proxies")
        if self.top_k > self.candidates:
            raise ValueError(f"top_k={self.top_k} is more than the {self.candidates} candidates")
        return self


class Planned(NamedTuple):
    """A mixture chosen for a proxy, why (``natural``, ``uniform``, ``sampled``, ``heldout``, ``top``,
    ``diverse``) and, from the second round on, the target predicted before it was trained."""

    weights: np.ndarray
    kind: str
    predicted: float | None = None


def heldout_count(cfg: MixSearchConfig) -> int:
    """First-round proxies left out of the first fit."""
    return int(cfg.heldout_fraction * cfg.proxies)


def floor_weights(weights: np.ndarray, min_weight: float) -> np.ndarray:
    """Mixtures with every weight at least ``min_weight``, still summing to 1."""
    k = weights.shape[-1]
    if min_weight * k >= 1:
        raise TokenmillError(f"mix_search.min_weight={min_weight} is too high for {k} domains: the floors alone "
                             f"sum to {min_weight * k:g}; use less than {1 / k:g}")
    return min_weight + (1 - k * min_weight) * weights


def sample_candidates(center: np.ndarray, n: int, *, concentration: float, min_weight: float = 0.0,
                      seed: int | Sequence[int] = 0) -> np.ndarray:
    """``n`` mixtures ``[n, K]`` from a Dirichlet with ``alpha = concentration · center`` (each alpha at
    least 0.01, so a domain at weight 0 can still come back), floored at ``min_weight``."""
    alpha = np.maximum(concentration * np.asarray(center, np.float64), 1e-2)
    samples = np.random.default_rng(seed).dirichlet(alpha, size=n)
    return floor_weights(samples / samples.sum(axis=1, keepdims=True), min_weight)


def first_round(natural: np.ndarray, cfg: MixSearchConfig) -> list[Planned]:
    """The natural mixture, uniform, and Dirichlet samples around the natural one; the last
    ``heldout_count`` samples are held out of the first fit."""
    k = len(natural)
    sampled = sample_candidates(natural, cfg.proxies - 2, concentration=cfg.concentration,
                                min_weight=cfg.min_weight, seed=[cfg.seed, 1])
    held = len(sampled) - heldout_count(cfg)
    return [Planned(np.asarray(natural, np.float64), "natural"), Planned(np.full(k, 1 / k), "uniform"),
            *(Planned(w, "sampled" if i < held else "heldout") for i, w in enumerate(sampled))]


def resolve_regressor(kind: str) -> str:
    """The regressor ``kind`` names: ``lightgbm``, ``hist_gradient_boosting`` or ``linear``."""
    if kind == "linear":
        return kind
    if importlib.util.find_spec("lightgbm") is not None:
        return "lightgbm"
    if kind == "lightgbm":
        raise TokenmillError("mix_search.regressor lightgbm needs the lightgbm package: pip install lightgbm "
                             "(or pip install 'tokenmill[mix]'), or set regressor: auto")
    if importlib.util.find_spec("sklearn") is not None:
        return "hist_gradient_boosting"
    raise TokenmillError("mix_search.regressor auto needs lightgbm or scikit-learn: pip install lightgbm, or set "
                         "regressor: linear")


class _Linear:
    """Least squares on the weights (with an intercept), RegMix's linear baseline."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        design = np.column_stack([np.ones(len(x)), x])
        self.coef = np.linalg.lstsq(design, y, rcond=None)[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.coef[0] + x @ self.coef[1:]


def fit_regressor(x: np.ndarray, y: np.ndarray, kind: str = "auto", seed: int = 0) -> Any:
    """A model of target ``y`` from mixtures ``x [n, K]``, deterministic given ``seed``.

    The trees take RegMix's 1000 rounds at learning rate 0.01, but with leaves of a few samples: RegMix
    fits hundreds of proxies, a search here tens, where LightGBM's default 20 per leaf allows no split.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    kind = resolve_regressor(kind)
    leaf = max(2, min(20, len(x) // 10))
    if kind == "lightgbm":
        import lightgbm

        model = lightgbm.LGBMRegressor(objective="regression", n_estimators=1000, learning_rate=0.01, num_leaves=8,
                                       min_child_samples=leaf, random_state=seed, deterministic=True,
                                       force_row_wise=True, n_jobs=1, verbose=-1)
        return model.fit(x, y)
    if kind == "hist_gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingRegressor

        model = HistGradientBoostingRegressor(max_iter=1000, learning_rate=0.01, max_leaf_nodes=8,
                                              min_samples_leaf=leaf, early_stopping=False, random_state=seed)
        return model.fit(x, y)
    return _Linear(x, y)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """The target ``model`` predicts for each mixture of ``x [n, K]``."""
    return np.asarray(model.predict(np.asarray(x, np.float64)), np.float64)


def spearman_rho(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Rank correlation of predicted and measured targets; None with fewer than 3 pairs or when either
    side is constant (no ranking to compare)."""
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(measured) == 0:
        return None
    return float(spearmanr(predicted, measured).statistic)


def candidate_pool(model: Any, natural: np.ndarray, cfg: MixSearchConfig,
                   seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.candidates`` mixtures and their predictions: half from the prior around the natural
    mixture, half drawn tightly around the mean of the prior's ``top_k`` best (CLIMB's narrowing of the
    search space), so the answer is sought both broadly and where the model already points."""
    local = cfg.candidates // 2
    prior = sample_candidates(natural, cfg.candidates - local, concentration=cfg.concentration,
                              min_weight=cfg.min_weight, seed=[*seed, 0])
    prior_pred = predict(model, prior)
    center = prior[np.argsort(prior_pred, kind="stable")[:cfg.top_k]].mean(axis=0)
    near = sample_candidates(center, local, concentration=LOCAL_CONCENTRATION * len(natural),
                             min_weight=cfg.min_weight, seed=[*seed, 1])
    return np.vstack([prior, near]), np.concatenate([prior_pred, predict(model, near)])


def choose_next_round(model: Any, natural: np.ndarray, measured: np.ndarray, cfg: MixSearchConfig,
                      round_index: int) -> list[Planned]:
    """The next ``proxies_per_round`` mixtures: the best predicted candidates, each at least
    ``MIN_DISTANCE`` from every mixture measured or chosen, then (``diverse_fraction``) the candidates
    of the best predicted quarter farthest from all of those, where the model knows least."""
    pool, pred = candidate_pool(model, natural, cfg, [cfg.seed, 2, round_index])
    order = np.argsort(pred, kind="stable")
    n = cfg.proxies_per_round
    n_top = n - math.ceil(cfg.diverse_fraction * n)
    taken = [np.asarray(w, np.float64) for w in measured]
    nearest = _distance_to(pool, taken)
    chosen: list[Planned] = []
    for i in order:
        if len(chosen) == n_top:
            break
        if nearest[i] >= MIN_DISTANCE:
            chosen.append(Planned(pool[i], "top", float(pred[i])))
            nearest = np.minimum(nearest, _distance_to(pool, [pool[i]]))
    promising = order[:max(n, len(order) // 4)]
    while len(chosen) < n:
        i = promising[np.argmax(nearest[promising])]
        chosen.append(Planned(pool[i], "diverse", float(pred[i])))
        nearest = np.minimum(nearest, _distance_to(pool, [pool[i]]))
    return chosen


def best_mixture(model: Any, natural: np.ndarray, cfg: MixSearchConfig) -> tuple[np.ndarray, float]:
    """The mean of the ``top_k`` best predicted of ``candidates`` sampled mixtures, and the target the
    model predicts for that mean."""
    pool, pred = candidate_pool(model, natural, cfg, [cfg.seed, 3])
    best = pool[np.argsort(pred, kind="stable")[:cfg.top_k]].mean(axis=0)
    return best, float(predict(model, best[None])[0])


def _distance_to(pool: np.ndarray, mixtures: list[np.ndarray]) -> np.ndarray:
    """Each pool mixture's L1 distance to the nearest of ``mixtures`` (inf when there are none)."""
    nearest = np.full(len(pool), np.inf)
    for w in mixtures:
        nearest = np.minimum(nearest, np.abs(pool - w).sum(axis=1))
    return nearest
