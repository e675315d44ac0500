"""CoLoR-Filter: keep the documents a target set makes most likely (Brandfonbrener et al., NeurIPS 2024).

"CoLoR-Filter: Conditional Loss Reduction Filtering for Targeted Language Model Pre-training"
(arXiv:2406.10670). Two auxiliary LMs: θ_prior, trained on pool data, and θ_prior+down, the prior
fine-tuned on the downstream (target) data. The CoLoR score of a sequence x is its conditional loss
reduction, ``−log p(x | θ_prior) − (−log p(x | θ_prior+down))``; the paper keeps the n of τ·n
candidates with the largest reduction. Here the prior is a proxy trained on a uniform pool sample, the
conditional model is that prior continued on the target set, losses are per UTF-8 byte (the paper's
sequences all have one length; documents here do not) and the keep rule (``top_fraction`` ≈ 1/τ,
``token_budget``, ...) comes from ``ScoreStep``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tokenmill.select.base import TargetSet
from tokenmill.select.proxy import ProxyLab, ProxyParams, ProxyScoreStep


class ColorFilterParams(ProxyParams):
    step: Literal["color_filter"] = "color_filter"
    target: TargetSet = Field(description="Documents of the distribution to select for (the paper's "
                              "downstream data): the conditional model is the prior trained further on them.")
    target_steps: int = Field(50, gt=0, description="Optimizer steps that continue the prior on the target set.")
    target_lr: float | None = Field(None, gt=0, description="Peak learning rate of that continuation; "
                                    "default: proxy.lr.")


class ColorFilter(ProxyScoreStep):
    """Score = prior bits/byte − conditional bits/byte: how much the target set made a document likelier."""

    Params = ColorFilterParams

    def fit_proxies(self, lab: ProxyLab, pool: list[str], target: list[str], by_domain: dict) -> None:
        p = self.params
        (self.prior,) = lab.train(pool, "prior")
        (self.conditional,) = lab.train(target, "conditional", init=self.prior, steps=p.target_steps,
                                        lr=p.target_lr)

    def proxy_scores(self, table: pa.Table) -> np.ndarray:
        texts = table["text"]
        return self.lab.bits_per_byte(self.prior, texts) - self.lab.bits_per_byte(self.conditional, texts)
