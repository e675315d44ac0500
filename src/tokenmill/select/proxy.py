"""Small proxy language models for model-based data selection: train, continue, score, count the cost.

CoLoR-Filter, reference perplexity and PreSelect all rank documents by the losses of small LMs. Here
those LMs are tokenmill's own: documents are packed with ``tokens.pack`` and trained by
``train.loop.train`` (so a proxy runs wherever training runs, CPU or GPU) inside a scratch folder.
A document's loss is measured in **bits per UTF-8 byte**, which does not depend on the tokenizer and
puts long and short documents on one scale.

``ProxyScoreStep`` is the base of those steps. Its model-fit round gathers a uniform pool sample
(the proxy tokenizer and the prior train on it) and the pool part of the target set, then the
subclass trains its proxies in a temporary folder. It also keeps the books: training FLOPs
(``Llama.flops_per_token``: 6·N per token plus attention), scoring FLOPs (a forward pass: a third of
that) and milliseconds of work, reported as the integer counters ``proxy_flops`` and ``proxy_ms``.
Counters are summed over shards into the step's ``stats.json``, so each shard reports the cost of
its own scoring plus a share of the one-off fitting cost in proportion to its documents: the step
total is the whole selection cost (up to rounding). ``proxy_ms`` adds up the time of parallel
workers, so it can exceed the step's wall time.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
import shutil
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import TokenmillError
from tokenmill.curate.base import StepResult
from tokenmill.documents.schema import make_table
from tokenmill.documents.shards import write_parquet_atomic
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.select.base import ScoreParams, ScoreStep, TargetSet, TextSample, merge_samples, sample_rows
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import load_tokenizer, train_tokenizer
from tokenmill.train.checkpoint import checkpoints, load_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.device import resolve_device, uses_bf16
from tokenmill.train.loop import train as train_model


class ProxyConfig(BaseModel):
    """Shape, training budget and tokenizer of the proxy LMs a selection step trains."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, gt=0, description="Hidden size of each proxy model.")
    n_layers: int = Field(2, gt=0, description="Transformer blocks of each proxy model.")
    n_heads: int = Field(4, gt=0, description="Attention heads of each proxy model (dim must split evenly).")
    seq_len: int = Field(128, gt=1, description="Tokens per training sequence and per scoring window.")
    batch_size: int = Field(16, gt=0, description="Sequences per optimizer step.")
    steps: int = Field(200, gt=0, description="Optimizer steps to train a proxy from scratch.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (cosine decay after warm-up).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu) or a torch device string.")
    seed: int = Field(0, description="Seed of initialisation and data order.")
    tokenizer_path: str | None = Field(
        None, description="Local Hugging Face tokenizer directory; empty: train a byte-level BPE on the pool sample."
    )
    vocab_size: int = Field(2048, ge=260, description="Vocabulary of a tokenizer trained on the pool sample.")
    score_batch_size: int = Field(32, gt=0, description="Windows per forward pass when scoring documents.")
    max_score_chars: int | None = Field(
        4096, gt=0, description="Score only each document's first this many characters (cost bound); null: all."
    )


@dataclass
class ProxyCost:
    """Compute spent on selection: model FLOPs and wall seconds."""

    flops: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: "ProxyCost") -> "ProxyCost":
        return ProxyCost(self.flops + other.flops, self.seconds + other.seconds)

    def scaled(self, share: float) -> "ProxyCost":
        return ProxyCost(self.flops * share, self.seconds * share)

    def counters(self) -> dict[str, int]:
        return {"proxy_flops": int(self.flops), "proxy_ms": int(self.seconds * 1000)}


class ProxyLab:
    """Trains and scores the proxy LMs of one selection step in ``workdir``, adding up their FLOPs.

    The tokenizer is loaded from ``cfg.tokenizer_path`` or trained on ``sample_texts`` (the pool
    sample), so every proxy of a step shares one vocabulary.
    """

    def __init__(self, cfg: ProxyConfig, workdir: Path, sample_texts: Sequence[str] = ()):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.flops = 0.0
        self.device = resolve_device(cfg.device)
        if cfg.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        elif not sample_texts:
            raise TokenmillError("proxy: no tokenizer_path and no pool sample to train a proxy tokenizer on")
        else:
            self.tokenizer = train_tokenizer(sample_texts, cfg.vocab_size, self.workdir / "tokenizer")

    def model_config(self, dim: int | None = None) -> ModelConfig:
        cfg = self.cfg
        return ModelConfig(
            vocab_size=len(self.tokenizer), dim=dim or cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            max_seq_len=cfg.seq_len, tie_embeddings=True, eos_id=self.tokenizer.eos_token_id,
        )

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens ``texts`` become in training (each document with its EOS)."""
        if not texts:
            return 0
        encoded = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)
        return sum(len(ids) + 1 for ids in encoded["input_ids"])

    def train(
        self, texts: Sequence[str], name: str, *, init: Llama | None = None, steps: int | None = None,
        lr: float | None = None, checkpoints_kept: int = 1, dim: int | None = None,
    ) -> list[Llama]:
        """Train a proxy of width ``dim`` (default ``cfg.dim``) on ``texts`` from scratch, or continue
        a copy of ``init``, for ``steps`` at peak rate ``lr`` (defaults: ``cfg``'s). Returns up to
        ``checkpoints_kept`` evenly spaced checkpoints of the run (at least two when asked for two or
        more), oldest first; the last is the final model. ``name`` is the run's scratch sub-folder."""
        steps = steps or self.cfg.steps
        if not 1 <= checkpoints_kept <= steps:
            raise TokenmillError(f"proxy: checkpoints_kept must be in [1, steps={steps}], got {checkpoints_kept}")
        run = self.workdir / name
        shutil.rmtree(run, ignore_errors=True)  # a stale run on other documents must not be resumed
        # One domain label: the loader then streams every document, however few tokens each has.
        docs = make_table({"id": str(i), "text": t, "domain": "proxy", "source": name} for i, t in enumerate(texts))
        write_parquet_atomic(docs, run / "docs" / "shard-00000.parquet")
        meta = pack_documents([run / "docs" / "shard-00000.parquet"], self.tokenizer, run / "tokens", workers=1)
        if meta["n_tokens"] <= self.cfg.seq_len:
            raise TokenmillError(
                f"proxy {name!r}: its {len(texts)} documents hold {meta['n_tokens']} tokens, fewer than one "
                f"training window of seq_len={self.cfg.seq_len}; give it more documents or a shorter seq_len"
            )
        model_cfg = init.cfg if init is not None else self.model_config(dim)
        train_cfg = self._train_config(steps, lr or self.cfg.lr, checkpoints_kept)
        start = copy.deepcopy(init).cpu() if init is not None else None  # the caller's model stays as it is
        summary = train_model(model_cfg, train_cfg, run / "tokens", run / "train", init_model=start, progress=False)
        models = []
        for _, path in checkpoints(run / "train" / "checkpoints"):
            model = Llama(model_cfg)
            load_checkpoint(path, model)
            models.append(model.eval())
        self.flops += models[-1].flops_per_token(self.cfg.seq_len) * summary["tokens"]
        return models

    def _train_config(self, steps: int, lr: float, checkpoints_kept: int) -> TrainConfig:
        cfg = self.cfg
        return TrainConfig(
            seq_len=cfg.seq_len, micro_batch_size=cfg.batch_size, global_batch_tokens=cfg.batch_size * cfg.seq_len,
            max_steps=steps, lr=lr, warmup_steps=min(cfg.warmup_steps, steps // 2), schedule="cosine",
            device=cfg.device, seed=cfg.seed, log_every=steps, eval_every=steps,
            # saves at multiples of ckpt_every and at the end: at most checkpoints_kept of them
            ckpt_every=-(-steps // checkpoints_kept), keep_last_k=checkpoints_kept,
        )

    def bits_per_byte(self, model: Llama, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each document's loss in bits per UTF-8 byte of its first ``cfg.max_score_chars`` characters
        (NaN for an empty one); see ``document_bits``. Leaves ``model`` on the lab's device."""
        bits, n_bytes = self._bits_and_bytes(model, texts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_bytes > 0, bits / n_bytes, np.nan)

    def pooled_bits_per_byte(self, model: Llama, texts: Sequence[str]) -> float:
        """Bits per byte of a whole set: bits and bytes summed over its documents, as ``model.bpb`` pools."""
        bits, n_bytes = self._bits_and_bytes(model, texts)
        return float(bits.sum() / n_bytes.sum())

    def _bits_and_bytes(self, model: Llama, texts: Sequence[str] | pa.Array | pa.ChunkedArray):
        if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = pa.array(list(texts), pa.large_string())
        if self.cfg.max_score_chars is not None:
            texts = pc.utf8_slice_codeunits(texts, 0, self.cfg.max_score_chars)
        bits, tokens = document_bits(model, self.tokenizer, texts.to_pylist(), seq_len=self.cfg.seq_len,
                                     batch_size=self.cfg.score_batch_size, device=self.device)
        self.flops += model.flops_per_token(self.cfg.seq_len) / 3 * tokens
        return bits, pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.float64)


class ProxyParams(ScoreParams):
    """Parameters shared by the steps that select with proxy LMs."""

    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="Shape and budget of the proxy LMs.")
    sample_docs: int = Field(2000, ge=1, description="Pool documents (a uniform sample by id hash) that the "
                             "proxy tokenizer and the pool-trained proxies learn from.")
    scratch: str | None = Field(None, description="Folder for the proxies' training runs, deleted once they "
                                "are loaded; default: the system's temporary folder.")


class PoolPart(NamedTuple):
    """One shard's contribution to fitting the proxies."""

    rows: int
    pool: TextSample
    target: TextSample | None
    by_domain: dict[str, TextSample]


class ProxyScoreStep(ScoreStep):
    """A ScoreStep whose scorer is a set of proxy LMs trained on a pool sample and the target set.

    Subclasses implement ``fit_proxies(lab, pool, target, by_domain)`` and ``proxy_scores(table)``;
    this class gathers the samples, runs the fit in a scratch folder and accounts for the cost.
    """

    reuse_fit_scores = True  # proxies are costly: score each document once, in the fit pass

    def __init__(self, params: ProxyParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.lab: ProxyLab | None = None
        self.fit_cost = ProxyCost()  # one-off: proxies trained, sample and target scored
        self._pool_rows = 0
        self._unreported = ProxyCost()  # scoring done in this process since it last reported

    @abstractmethod
    def fit_proxies(self, lab: ProxyLab, pool: list[str], target: list[str],
                    by_domain: dict[str, list[str]]) -> None:
        """Train the proxies with ``lab`` (in its scratch folder) from the pool sample, the target
        texts and, if ``domain_sample_docs()`` asks for them, per-domain samples."""

    @abstractmethod
    def proxy_scores(self, table: pa.Table) -> np.ndarray:
        """One score per document of ``table``, higher = better (``lab`` counts the FLOPs)."""

    def target_set(self) -> TargetSet | None:
        """The documents to select for (gathered from the pool and read from files for ``fit_proxies``)."""
        return getattr(self.params, "target", None)

    def proxy_config(self) -> ProxyConfig:
        return self.params.proxy

    def pool_sample_docs(self) -> int:
        """How many pool documents to sample; ``fit_proxies`` gets them in id-hash (random) order."""
        return self.params.sample_docs

    def domain_sample_docs(self) -> int:
        """Documents to sample from each domain for per-domain statistics; 0: none."""
        return 0

    # ---- fitting ---------------------------------------------------------------------------------------
    @property
    def needs_model_fit(self) -> bool:
        return True

    def fit_model_map(self, table: pa.Table) -> PoolPart:
        p, target = self.params, self.target_set()
        every = np.ones(table.num_rows, bool)
        by_domain = {}
        if self.domain_sample_docs():
            domains = table["domain"].to_numpy(zero_copy_only=False)
            by_domain = {d: sample_rows(table, domains == d, self.domain_sample_docs(), p.seed)
                         for d in np.unique(domains)}
        return PoolPart(
            table.num_rows, sample_rows(table, every, self.pool_sample_docs(), p.seed),
            sample_rows(table, target.pool_mask(table), target.max_docs, p.seed)
            if target is not None and target.uses_pool else None, by_domain)

    def fit_model_reduce(self, parts: list[PoolPart]) -> None:
        start, p, target = time.perf_counter(), self.params, self.target_set()
        pool = merge_samples([part.pool for part in parts], self.pool_sample_docs())
        target_texts = []
        if target is not None:
            target_texts = target.read_sources(p.seed) + merge_samples(
                [part.target for part in parts if part.target is not None], target.max_docs)
            if not target_texts:
                raise TokenmillError(f"{self.name}: the target set is empty (sources "
                                     f"{[s.path for s in target.sources]}, domains {target.domains}, "
                                     f"score_column {target.score_column!r} matched no document); check `target`")
        names = sorted({d for part in parts for d in part.by_domain})
        by_domain = {d: merge_samples([part.by_domain[d] for part in parts if d in part.by_domain],
                                      self.domain_sample_docs()) for d in names}
        if p.scratch:
            Path(p.scratch).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"tokenmill-{self.name}-", dir=p.scratch) as workdir:
            self.lab = ProxyLab(self.proxy_config(), Path(workdir), pool)
            self.fit_proxies(self.lab, pool, target_texts, by_domain)
        self._pool_rows = sum(part.rows for part in parts)
        self.fit_cost = ProxyCost(self.lab.flops, time.perf_counter() - start)
        self.lab.flops = 0.0

    # ---- scoring and its cost --------------------------------------------------------------------------
    def score(self, table: pa.Table) -> np.ndarray:
        start = time.perf_counter()
        scores = self.proxy_scores(table)
        self._unreported += ProxyCost(self.lab.flops, time.perf_counter() - start)
        self.lab.flops = 0.0
        return scores

    def _take_unreported(self) -> ProxyCost:
        cost, self._unreported = self._unreported, ProxyCost()
        return cost

    def fit_map(self, table: pa.Table) -> Any:
        part = super().fit_map(table)
        return part if self.lab is None else (part, self._take_unreported())

    def fit_reduce(self, parts: list[Any]) -> None:
        if self.lab is None:  # the model-fit round
            super().fit_reduce(parts)
            return
        for _, cost in parts:  # the global-rule round scored every shard: a fitting cost too
            self.fit_cost += cost
        super().fit_reduce([part for part, _ in parts])

    def process(self, table: pa.Table) -> StepResult:
        result = super().process(table)
        share = self.fit_cost.scaled(table.num_rows / max(self._pool_rows, 1))
        result.counters.update((share + self._take_unreported()).counters())
        return result


def document_bits(
    model: Llama, tokenizer, texts: Sequence[str], *, seq_len: int, batch_size: int, device: torch.device
) -> tuple[np.ndarray, int]:
    """Total −log₂ p of each document's tokens, and how many tokens were scored.

    A document is ``[eos] + encode(text)`` (the boundary the model saw in training) cut into
    back-to-back windows of ``seq_len`` predictions, each scored from a fresh context: cheaper than
    ``model.bpb``'s half-overlapping windows (every token is read once), and ranking documents
    needs comparable scores, not the best estimate of each one. Windows of all documents are
    batched longest first to waste little on padding.
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), np.int64, len(encoded))
    flat = np.fromiter(chain.from_iterable([eos, *ids] for ids in encoded), np.int64, int(lengths.sum()))
    doc_start = np.cumsum(lengths) - lengths
    n_targets = lengths - 1
    n_windows = -(-n_targets // seq_len)
    window_doc = np.repeat(np.arange(len(encoded)), n_windows)
    window_k = np.arange(len(window_doc)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    window_begin = doc_start[window_doc] + window_k * seq_len
    window_len = np.minimum(seq_len, n_targets[window_doc] - window_k * seq_len)
    order = np.argsort(-window_len, kind="stable")

    bits = np.zeros(len(encoded), np.float64)
    bf16 = uses_bf16("auto", device)
    model = model.to(device).eval()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            width = int(window_len[batch].max())
            span = np.arange(width + 1)
            positions = window_begin[batch, None] + span
            tokens = torch.from_numpy(flat[np.minimum(positions, len(flat) - 1)]).to(device)
            scored = torch.from_numpy(span[None, 1:] <= window_len[batch, None]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(tokens[:, :-1])
            nll = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
            row_bits = (nll * scored).sum(dim=1).double() / math.log(2)
            np.add.at(bits, window_doc[batch], row_bits.cpu().numpy())
    return bits, int(n_targets.sum())
