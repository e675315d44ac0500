"""Reference perplexity: score documents by how well a small LM of "good" text predicts them (CCNet).

Wenzek et al., "CCNet: Extracting High Quality Monolingual Datasets from Web Crawl Data" (LREC 2020,
arXiv:1911.00359) score every document with a 5-gram LM trained on Wikipedia and split each
language into **head**, **middle** and **tail** at the 33rd and 66th percentile of that language's
perplexity. Here the reference LM is a proxy trained on a ``TargetSet`` (or a local Hugging Face
Llama-family model), the loss is in bits per byte, and the split is per *domain*, its cut-offs
estimated from a uniform sample of each domain. Keep bands with ``band`` (e.g. ``[head, middle]``),
or set ``band: null`` and rank the whole pool by the score with a ``keep`` rule instead.

The score is −(bits per byte under the reference LM), so, as for every ``ScoreStep``, higher is
better: closer to the reference text.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from tokenmill.curate.base import StepResult
from tokenmill.model.hf import import_hf
from tokenmill.model.llama import Llama
from tokenmill.select.base import TargetSet
from tokenmill.select.proxy import ProxyConfig, ProxyLab, ProxyParams, ProxyScoreStep

BANDS = ("head", "middle", "tail")
Band = Literal["head", "middle", "tail"]


class PerplexityBandParams(ProxyParams):
    step: Literal["perplexity_band"] = "perplexity_band"
    reference: TargetSet | None = Field(None, description="Documents the reference LM is trained on (CCNet: "
                                        "Wikipedia). Exclusive with `reference_model_path`.")
    reference_model_path: str | None = Field(None, description="A local Hugging Face Llama-family model folder "
                                        "(config.json, *.safetensors and its tokenizer) to use as the "
                                        "reference LM instead of training one.")
    band: list[Band] | None = Field(["head", "middle"], description="Perplexity bands to keep, each domain "
                                    "split at `cutoffs`: head (lowest perplexity), middle, tail. null: keep by "
                                    "the `keep` rule on the score instead.")
    cutoffs: tuple[float, float] = Field((1 / 3, 2 / 3), description="Per-domain perplexity quantiles that "
                                         "end the head and the middle (CCNet's 33rd and 66th percentiles).")
    domain_sample_docs: int = Field(500, ge=1, description="Documents per domain (a uniform sample) scored to "
                                    "estimate its cut-offs.")

    @model_validator(mode="after")
    def _consistent(self) -> "PerplexityBandParams":
        if (self.reference is None) == (self.reference_model_path is None):
            raise ValueError("give either `reference` (documents to train the reference LM on) or "
                             "`reference_model_path` (a local Hugging Face model folder)")
        if self.band is not None and self.keep is not None:
            raise ValueError("give either `band` (per-domain perplexity bands) or `keep` (a rule on the "
                             "score), not both; set band: null to use keep")
        if not self.band and self.band is not None:
            raise ValueError("band: name at least one of head, middle, tail (or null to use `keep`)")
        if not 0 < self.cutoffs[0] < self.cutoffs[1] < 1:
            raise ValueError(f"cutoffs must be increasing quantiles inside (0, 1), got {self.cutoffs}")
        return self


class PerplexityBand(ProxyScoreStep):
    """Score = −bits/byte under a reference LM; keep chosen per-domain perplexity bands (CCNet)."""

    Params = PerplexityBandParams

    def __init__(self, params: PerplexityBandParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.reference: Llama | None = None
        self.edges: dict[str, np.ndarray] = {}  # per domain: bits/byte ending the head and the middle

    def target_set(self) -> TargetSet | None:
        return self.params.reference

    def domain_sample_docs(self) -> int:
        return self.params.domain_sample_docs if self.params.band is not None else 0

    def proxy_config(self) -> ProxyConfig:
        if self.params.reference_model_path is None:
            return self.params.proxy
        return self.params.proxy.model_copy(update={"tokenizer_path": self.params.reference_model_path})

    def fit_proxies(self, lab: ProxyLab, pool: list[str], target: list[str],
                    by_domain: dict[str, list[str]]) -> None:
        if self.params.reference_model_path is not None:
            self.reference, _ = import_hf(self.params.reference_model_path)
        else:
            (self.reference,) = lab.train(target, "reference")
        self.edges = {domain: np.nanquantile(lab.bits_per_byte(self.reference, texts), self.params.cutoffs)
                      for domain, texts in by_domain.items()}

    def proxy_scores(self, table: pa.Table) -> np.ndarray:
        return -self.lab.bits_per_byte(self.reference, table["text"])

    def bands(self, table: pa.Table, scores: np.ndarray) -> np.ndarray:
        """Each document's band name (a NaN score, an empty document, falls in the tail)."""
        domains = table["domain"].to_numpy(zero_copy_only=False)
        unseen = set(np.unique(domains)) - set(self.edges)
        if unseen:
            raise RuntimeError(f"{self.name}: domain(s) {sorted(unseen)} had no document in the fit pass")
        edges = np.stack([self.edges[d] for d in domains]) if len(domains) else np.empty((0, 2))
        bits = np.nan_to_num(-scores, nan=np.inf)
        return np.array(BANDS)[(bits > edges[:, 0]).astype(int) + (bits > edges[:, 1])]

    def process(self, table: pa.Table) -> StepResult:
        result = super().process(table)
        if self.params.band is None:
            return result
        kept = result.kept
        band = self.bands(kept, kept[self.score_column].to_numpy(zero_copy_only=False))
        banded = self.split(kept, np.where(np.isin(band, self.params.band), "", np.char.add("perplexity_", band)))
        banded.counters.update(result.counters)
        return banded
