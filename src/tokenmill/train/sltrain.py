"""SLTrain (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining"): every block linear's weight becomes W = (alpha/rank)·B·A + S.

B·A is a trainable low-rank product; S has a fixed random support of ``density``·m·n entries, stored as
their flat indices (a buffer) and trainable values, never as a dense mask. Initialisation is the paper's
(and its code's): B zero, A Kaiming-uniform (U(±1/sqrt(n))), S's values U(±1/sqrt(n)), support uniform
without replacement, so training starts from the sparse part alone.

It is applied from outside the model, as a ``torch.nn.utils.parametrize`` parametrization of each
``nn.Linear.weight`` inside the blocks: the model still reads ``q_proj.weight`` (now merged on the fly),
embeddings, norms and the head stay dense, and the dense weights are dropped (SLTrain pretrains from
scratch). Support and starting values come from a generator seeded with the run's seed, so a resumed
run rebuilds the same support (the indices are also in the checkpoint, which checks it). Apply before
``parallelize``: its wrappers and shards must see the factors, and the optimizer only them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.train.config import SLTrainConfig


class SparsePlusLowRank(nn.Module):
    """The parametrization of one m×n weight: ``forward(B, A, values)`` is the dense W."""

    def __init__(self, shape: tuple[int, int], cfg: SLTrainConfig, nnz: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = shape
        self.shape = shape
        self.scale = cfg.alpha / cfg.rank
        numel = out_features * in_features
        index_dtype = torch.int32 if numel < 2**31 else torch.int64  # half the bytes whenever it can
        support = torch.randperm(numel, generator=generator)[:nnz].sort().values
        self.register_buffer("indices", support.to(index_dtype))
        bound = 1 / math.sqrt(in_features)
        self._start: tuple[torch.Tensor, ...] | None = (
            torch.zeros(out_features, cfg.rank),
            torch.empty(cfg.rank, in_features).uniform_(-bound, bound, generator=generator),
            torch.empty(nnz).uniform_(-bound, bound, generator=generator),
        )

    def forward(self, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        low_rank = self.scale * (B @ A)  # bf16 under autocast: the sparse values follow its dtype
        return low_rank.flatten().index_add(0, self.indices, values.to(low_rank.dtype)).view(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The starting (B, A, values), once: parametrize calls this to create the trained tensors. They
        are not a decomposition of ``weight``, which SLTrain replaces rather than approximates."""
        if self._start is None:
            raise TokenmillError("an SLTrain weight is trained as its factors: it cannot be assigned a dense value")
        start, self._start = self._start, None
        return tuple(t.to(weight.device, weight.dtype) for t in start)


def apply_sltrain(model: Llama, cfg: SLTrainConfig, model_cfg: ModelConfig, seed: int) -> None:
    """Reparametrise every ``nn.Linear`` in ``model.layers`` in place; errors name the recipe field and
    the first matrix it does not fit. Refuses a starting point (``init_from``, ``grow_from``), whose
    weights it would throw away."""
    for field in ("init_from", "grow_from"):
        if getattr(model_cfg, field):
            raise TokenmillError(f"train.optimizer sltrain pretrains from scratch: it would discard the weights of "
                                 f"model.{field}={getattr(model_cfg, field)}; use another optimizer to continue them")
    generator = torch.Generator().manual_seed(seed)
    linears = [(name, m) for name, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
    for name, linear in linears:
        shape = tuple(linear.weight.shape)
        where = f"the {shape[0]}×{shape[1]} weight of {name}"
        if cfg.rank > min(shape):
            raise TokenmillError(f"train.optimizer.rank={cfg.rank} exceeds {where}: use at most {min(shape)}")
        nnz = round(cfg.density * shape[0] * shape[1])
        if nnz == 0:
            raise TokenmillError(f"train.optimizer.density={cfg.density} keeps no entry of {where}: use at least "
                                 f"{1 / (shape[0] * shape[1]):.2g}")
        parametrize.register_parametrization(linear, "weight", SparsePlusLowRank(shape, cfg, nnz, generator))
