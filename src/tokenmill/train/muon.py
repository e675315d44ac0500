"""Muon that also steps FSDP2-sharded weights, by gathering each matrix for the part that needs it whole.

``torch.optim.Muon`` assumes each parameter is a whole matrix; under FSDP2 a parameter is a DTensor
holding only this rank's rows. Muon's momentum is elementwise, so it stays sharded like the parameter;
only the Newton–Schulz orthogonalisation needs the whole matrix. Each step therefore all-gathers each
matrix's (Nesterov) update in bf16, orthogonalises it redundantly on every rank, and applies this
rank's rows: one all-gather per matrix per step, no extra state. In one process nothing is gathered
and the step is ``torch.optim.Muon``'s, op for op: bit-identical to it, and it reads its checkpoints.

``whole`` and ``this_ranks_part`` are the two halves of that gather-per-parameter scheme; GaLore's SVD
uses them too.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` as one plain tensor on every rank: all-gathered if it is a DTensor, else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def this_ranks_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the whole-matrix ``full`` that this rank holds of ``like`` (a DTensor: the same
    placements, cut locally without communication, as every rank has ``full``), or ``full`` itself."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def orthogonalise(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """The quintic Newton–Schulz iteration ``torch.optim.Muon`` runs, in bf16, on the wide orientation
    (so the Gram matrix is the small one). ``update`` itself is never written."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.bfloat16()
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """``torch.optim.Muon``'s per-shape lr scale, of the whole matrix's shape (a DTensor's ``shape`` is
    the global one): 'original' √max(1, rows/cols), 'match_rms_adamw' 0.2·√max(rows, cols)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same settings, same state) over plain or FSDP2-sharded 2-D parameters."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if torch.is_complex(p) or grad.is_sparse:
                    raise RuntimeError("Muon steps real, dense weight matrices only")
                state = self.state[p]
                if "momentum_buffer" not in state:  # sharded like the gradient, so like the parameter
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                # Newton–Schulz runs in bf16 anyway: casting before the gather halves its bytes, same bits
                ortho = orthogonalise(whole(update.bfloat16()), group["ns_coefficients"], group["ns_steps"],
                                      group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(this_ranks_part(ortho, p), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
