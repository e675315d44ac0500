"""GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection"): Adam
whose moments live in a rank-r subspace of each weight matrix's gradient.

Every ``update_proj_gap`` steps the gradient G (m×n) is factored by SVD and its top-r singular vectors
become the projector P; in between, each step projects G onto P, runs Adam there (moments r×n or m×r
instead of m×n), and maps the normalised update back to m×n, scaled by ``scale``. The moments are kept
across a refresh, as in the paper. Weight decay is decoupled, on the full weight, like AdamW's.

Every piece of state is a tensor (the projector and the step count included), so torch.distributed
.checkpoint saves it by parameter name and a resumed run continues bit-identically.

Under FSDP2 a weight is a DTensor holding this rank's rows, and the SVD needs the whole gradient: each
step all-gathers it, and every rank computes the projection, the moments and the full update
redundantly, then applies its own rows (weight decay stays on the local shard). The projector and the
moments are only r wide, so they are kept whole, as plain tensors replicated on every rank (the same
kernels on the same gathered gradient give every rank the same values): DCP saves one copy, and a
checkpoint loads at any world size.
"""

from __future__ import annotations

from typing import Literal

import torch

from tokenmill.train.muon import this_ranks_part, whole


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's gradient projection, for 2-D parameters only."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 rank: int, update_proj_gap: int, scale: float,
                 proj_type: Literal["std", "left", "right"] = "std"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("GaLore projects weight matrices: every parameter must be 2-D")

    @staticmethod
    def _left(grad: torch.Tensor, proj_type: str) -> bool:
        """Whether the projector acts on the rows (Pᵀ·G, P m×r) rather than the columns (G·P, P n×r):
        'std' projects the shorter side, which keeps the projector the smaller matrix."""
        if proj_type == "std":
            return grad.shape[0] < grad.shape[1]
        return proj_type == "left"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = whole(p.grad)
                left = self._left(grad, group["proj_type"])
                rank = min(group["rank"], *grad.shape)
                state = self.state[p]
                if not state:
                    low_shape = (rank, grad.shape[1]) if left else (grad.shape[0], rank)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["projector"] = grad.new_zeros((grad.shape[0] if left else grad.shape[1], rank))
                    state["exp_avg"] = grad.new_zeros(low_shape)
                    state["exp_avg_sq"] = grad.new_zeros(low_shape)
                step = int(state["step"].item())
                projector = state["projector"]
                if step % group["update_proj_gap"] == 0:
                    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                    projector.copy_(u[:, :rank] if left else vh[:rank].T)
                state["step"] += 1
                step += 1
                low = projector.T @ grad if left else grad @ projector
                state["exp_avg"].lerp_(low, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(low, low, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
                normalised = state["exp_avg"] / (1 - beta1**step) / denom
                update = projector @ normalised if left else normalised @ projector.T
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(this_ranks_part(update, p), alpha=-group["lr"] * group["scale"])
        return loss
