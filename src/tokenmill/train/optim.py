"""The optimizers ``train.optimizer`` names, all built around nanoGPT's AdamW weight-decay split: decay
every ≥2-D weight (matmuls and embeddings), never norm gains or biases, whose scale is not a capacity
to regularise.

``muon`` and ``galore`` replace AdamW on the transformer blocks' weight matrices (attention and MLP
projections) only; embeddings, the output head and norms keep AdamW with train's lr, betas and eps,
the split modded-nanogpt and nanochat use. The two optimizers travel as one ``Combined``, which the
loop's lr schedule, gradient clipping and checkpoints treat like a single optimizer. ``sltrain``
changes the model, not the optimizer: it is AdamW over whatever parameters the model trains.

FSDP2: Muon's Newton–Schulz iteration and GaLore's SVD need each weight matrix whole, while FSDP2
shards every matrix across the processes. Both gather per parameter: each step all-gathers a matrix's
update (Muon) or gradient (GaLore), computes the whole-matrix step redundantly on every rank and applies
this rank's rows, so a run on N processes follows the one-process run (see ``muon`` and ``galore``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tokenmill import TokenmillError
from tokenmill.train.config import GaLoreConfig, MuonConfig, TrainConfig
from tokenmill.train.galore import GaLoreAdamW
from tokenmill.train.muon import Muon


def _adamw(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The fused kernel (CUDA and CPU) updates each tensor in one pass; on a CPU the default per-tensor
    loop makes six, a few percent of a small model's step."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]] or groups[:1]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cuda", "cpu")
    )


def build_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return _adamw([p for p in model.parameters() if p.requires_grad], cfg, device)


class Combined:
    """Several optimizers over disjoint parameters, stepped together. ``param_groups`` is all of
    theirs (the same dicts, so the loop's per-step lr reaches every one), and iterating yields the
    optimizers, which torch.distributed.checkpoint's get/set_optimizer_state_dict accept in place of
    one, saving and loading each by parameter name. ``state`` merges theirs, for whatever counts it."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict]:
        """Each parameter's state, from whichever optimizer holds it."""
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


class PerLayer(Combined):
    """One optimizer per parameter, each stepped by a hook the moment backward has accumulated that
    parameter's gradient, which is then freed (GaLore's per-layer weight updates): the model's gradients
    never exist at once, which is the memory the paper saves beside the optimizer state. ``step`` and
    ``zero_grad`` have nothing left to do. The hooks also sum the squared gradients, so the loop still logs
    the step's gradient norm (unclipped: there is no global norm to clip by before the first update)."""

    def __init__(self, optimizers: dict[nn.Parameter, torch.optim.Optimizer]):
        super().__init__(*optimizers.values())
        self._squares: torch.Tensor | None = None
        for p, opt in optimizers.items():
            p.register_post_accumulate_grad_hook(self._update(opt))

    def _update(self, opt: torch.optim.Optimizer):
        def hook(p: torch.Tensor) -> None:
            square = p.grad.detach().float().square().sum()
            self._squares = square if self._squares is None else self._squares + square
            opt.step()
            p.grad = None
        return hook

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def grad_norm(self) -> torch.Tensor:
        """The norm of the gradients of the backward passes since the last call."""
        squares, self._squares = self._squares, None
        return squares.sqrt() if squares is not None else torch.zeros(())


def _block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The blocks' 2-D trainable weights, whole or FSDP2-sharded (see the module docstring)."""
    return [p for p in model.layers.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer | Combined:
    """The optimizer ``cfg.optimizer`` names, over ``model``'s trainable parameters."""
    settings = cfg.optimizer
    if not isinstance(settings, (MuonConfig, GaLoreConfig)):  # adamw, and sltrain's reparametrised model
        return build_adamw(model, cfg, device)
    matrices = _block_matrices(model)
    chosen = {id(p) for p in matrices}
    trainable = [p for p in model.parameters() if p.requires_grad]
    others = [p for p in trainable if id(p) not in chosen]
    if isinstance(settings, MuonConfig):
        return Combined(_adamw(others, cfg, device), Muon(
            matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=settings.momentum,
            nesterov=settings.nesterov, ns_steps=settings.ns_steps, adjust_lr_fn=settings.adjust_lr_fn,
        ))

    def galore(params: list[nn.Parameter]) -> GaLoreAdamW:
        return GaLoreAdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, rank=settings.rank,
            update_proj_gap=settings.update_proj_gap, scale=settings.scale, proj_type=settings.proj_type,
        )

    if not settings.per_layer_update:
        return Combined(_adamw(others, cfg, device), galore(matrices))
    if any(isinstance(p, DTensor) for p in matrices):
        raise TokenmillError("optimizer.galore.per_layer_update runs in one process: FSDP2 sets the sharded "
                             "gradients after its reduce-scatter, where no per-parameter hook sees them")
    return PerLayer({p: galore([p]) if id(p) in chosen else _adamw([p], cfg, device) for p in trainable})
