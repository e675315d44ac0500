"""PreSelect: keep documents whose loss predicts how good a model is on the target (Shum et al., 2025).

"Predictive Data Selection: The Data That Predicts Is the Data That Teaches" (arXiv:2503.00808).
Given N models ranked by their downstream ability, a document's **predictive strength** is how well
the models' normalized losses on it (bits per character there, bits per byte here) reproduce that
ranking: with the models sorted from best to worst, S = (1/Z) Σ_{i<j} 1[loss_i < loss_j] over the
Z = N(N−1)/2 pairs, so S = 1 when the better a model is, the better it compresses the document.
Documents of a pool sample with the highest S are labelled positive, those with the lowest negative,
a fastText classifier is trained on them, and its P(positive) scores the whole pool.

The paper ranks public LLMs, trained on different data, by benchmark scores. Here the models are
proxies trained by ``proxy.py`` and their "ability" is their bits per byte on the target set. What
matters is that the family's members differ in *what* they know, not only in how much:

- ``family: domains`` (default): one pool run, then one copy of it continued on each pool domain
  (``domain_docs`` documents each) and one continued on the target, ``target_steps`` steps each. The
  specialists rank on the target by how related their domain is; a document ranks them the same way
  when it resembles the domains that help the target. This is the closest small-scale analogue of
  the paper's models trained on different corpora.
- ``family: checkpoints``: ``checkpoints`` evenly spaced checkpoints of a pool run for each width in
  ``widths`` and, when ``target_steps`` > 0, of the same runs continued on the target. With small,
  undertrained proxies every later checkpoint is better on almost every document, so S is 1 nearly
  everywhere and the labels are close to random (measured on the demo slices: 46 of 50 labelled
  documents at S = 1); use it with proxies trained near convergence.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama
from tokenmill.select.base import TargetSet
from tokenmill.select.proxy import ProxyLab, ProxyParams, ProxyScoreStep
from tokenmill.select.quality import FastTextHyper, fasttext_scores, load_fasttext, save_fasttext, \
    train_fasttext


def predictive_strength(doc_bits: np.ndarray, target_bits: np.ndarray) -> np.ndarray:
    """PreSelect's S per document: the share of model pairs whose order by loss on the document
    (``doc_bits`` [models, docs]) matches their order on the target (``target_bits`` [models]).
    Pairs of models tied on the target say nothing and are left out."""
    order = np.argsort(target_bits, kind="stable")  # best (lowest loss) first
    better, worse = np.triu_indices(len(order), 1)
    informative = target_bits[order][better] < target_bits[order][worse]
    if not informative.any():
        return np.full(doc_bits.shape[1], np.nan)
    bits = doc_bits[order]
    agree = bits[better[informative]] < bits[worse[informative]]
    return agree.mean(axis=0)


class PreSelectParams(ProxyParams):
    step: Literal["preselect"] = "preselect"
    target: TargetSet = Field(description="Documents whose loss ranks the proxy models (the paper's "
                              "downstream benchmarks).")
    family: Literal["domains", "checkpoints"] = Field("domains", description="The ranked models: a pool run "
                                                      "continued on each pool domain and on the target "
                                                      "(domains), or checkpoints of pool runs and their "
                                                      "target continuations (checkpoints); see the module doc.")
    domain_docs: int = Field(500, ge=1, description="family=domains: documents per pool domain (a uniform "
                             "sample) each specialist is continued on.")
    widths: list[int] | None = Field(None, min_length=1, description="Hidden size of each proxy run (other "
                                     "settings from `proxy`); default: one run of proxy.dim.")
    checkpoints: int = Field(4, ge=1, description="family=checkpoints: evenly spaced checkpoints taken from "
                             "each run as models.")
    target_steps: int = Field(50, ge=0, description="Optimizer steps of each continuation: on the target "
                              "and, for family=domains, on each domain; 0: no target continuation "
                              "(family=checkpoints only).")
    label_docs: int = Field(2000, ge=2, description="Pool documents (a uniform sample disjoint from the "
                            "proxies' training sample) whose predictive strength labels the classifier.")
    label_fraction: float = Field(0.2, gt=0, le=0.5, description="Share of the labelled documents taken as "
                                  "positives (highest strength), and the same share as negatives (lowest).")
    save_path: str | None = Field(None, description="Where to save the fastText scorer (.bin). Default: a "
                                   "temporary file removed when the run ends; on a multi-node Ray cluster "
                                   "give a path every node sees.")
    fasttext: FastTextHyper = Field(default_factory=FastTextHyper)

    @model_validator(mode="after")
    def _enough_models(self) -> "PreSelectParams":
        other = {"domains": {"widths", "checkpoints"}, "checkpoints": {"domain_docs"}}[self.family]
        if other & self.model_fields_set:
            raise ValueError(f"{sorted(other & self.model_fields_set)} do nothing with family={self.family}: "
                             f"drop them or set the other family")
        if self.family == "domains":
            if not self.target_steps:
                raise ValueError("PreSelect with family=domains continues the pool run for target_steps: set "
                                 "target_steps > 0")
            return self
        runs = len(self.widths or [None]) * (2 if self.target_steps else 1)
        if runs * self.checkpoints < 2:
            raise ValueError("PreSelect ranks at least two models: raise checkpoints, add widths or set "
                             "target_steps")
        return self


class PreSelect(ProxyScoreStep):
    """Score = P(positive) under a fastText classifier trained on documents of high vs low predictive strength."""

    Params = PreSelectParams

    def __init__(self, params: PreSelectParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.model_path: str | None = None
        self.strength: np.ndarray | None = None  # of the labelled documents, for inspection
        self.family_names: list[str] = []  # what each ranked model was trained on, for inspection

    def pool_sample_docs(self) -> int:
        return self.params.sample_docs + self.params.label_docs

    def domain_sample_docs(self) -> int:
        return self.params.domain_docs if self.params.family == "domains" else 0

    def proxy_family(self, lab: ProxyLab, pool: list[str], target: list[str],
                     by_domain: dict[str, list[str]]) -> list[Llama]:
        """The ranked models (see the module docstring); their names go to ``self.family_names``."""
        p = self.params
        if p.family == "domains":
            (base,) = lab.train(pool, "pool")
            self.family_names, models = ["pool"], [base]
            window = p.proxy.seq_len * p.proxy.batch_size
            for name, texts in [*sorted(by_domain.items()), ("target", target)]:
                if lab.count_tokens(texts) <= window:  # too little text to continue on: no specialist
                    continue
                models += lab.train(texts, f"{name}-specialist", init=base, steps=p.target_steps)
                self.family_names.append(name)
            if len(models) < 2:
                raise TokenmillError("PreSelect: no domain and no target set holds one batch of text "
                                     f"({window} tokens) to continue the pool run on; give more target documents")
            return models
        models, self.family_names = [], []
        for width in p.widths or [p.proxy.dim]:
            run = lab.train(pool, f"pool-{width}", dim=width, checkpoints_kept=p.checkpoints)
            models += run
            self.family_names += [f"pool-{width}"] * len(run)
            if p.target_steps:
                continued = lab.train(target, f"target-{width}", init=run[-1], steps=p.target_steps,
                                      checkpoints_kept=min(p.checkpoints, p.target_steps))
                models += continued
                self.family_names += [f"target-{width}"] * len(continued)
        return models

    def fit_proxies(self, lab: ProxyLab, pool: list[str], target: list[str], by_domain: dict) -> None:
        p = self.params
        train_docs, label_docs = pool[: p.sample_docs], pool[p.sample_docs :] or pool
        if label_docs is not pool:  # a model that learnt a labelled document would rank it too well
            unseen = set(label_docs)
            by_domain = {d: [t for t in texts if t not in unseen] for d, texts in by_domain.items()}
        models = self.proxy_family(lab, train_docs, target, by_domain)
        target_bits = np.array([lab.pooled_bits_per_byte(m, target) for m in models])
        doc_bits = np.stack([lab.bits_per_byte(m, label_docs) for m in models])
        scorable = np.isfinite(doc_bits).all(axis=0)
        self.strength = predictive_strength(doc_bits[:, scorable], target_bits)
        labelled = np.asarray(label_docs, dtype=object)[scorable]
        ranked = np.argsort(-self.strength, kind="stable")  # ties stay in sample (random) order
        n = max(1, round(p.label_fraction * len(ranked)))
        classifier = train_fasttext(list(labelled[ranked[:n]]), list(labelled[ranked[-n:]]), seed=p.seed,
                                    **p.fasttext.model_dump())
        self.model_path = save_fasttext(classifier, p.save_path, owner=self)

    def proxy_scores(self, table: pa.Table) -> np.ndarray:
        return fasttext_scores(load_fasttext(self.model_path), table["text"])
