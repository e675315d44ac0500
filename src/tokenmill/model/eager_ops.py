"""RMSNorm and RoPE with hand-written backward passes, for eager training (every CPU run).

Autograd through the composite formulas keeps each intermediate (the square, the mean, the rotated
half, the concatenation) and walks them back one elementwise pass at a time; on a CPU those passes over
[tokens, dim] tensors are memory-bound, and together they cost a few percent of a small model's step.
These functions make the fewest passes the arithmetic needs and keep only their inputs. Under
``torch.compile`` the plain formulas are used, since the compiler fuses them itself. Parameter names and
numbers are those of ``nn.RMSNorm`` and of Hugging Face's ``rotate_half`` RoPE.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps)).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = torch.mul(x, rstd)
        grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_normed = grad * weight
        # d/dx of x·rstd: rstd · (g - x̂ · mean(g · x̂)) along the normalised dimension
        dot = (grad_normed * normed).mean(dim=-1, keepdim=True)
        grad_x = grad_normed.addcmul_(normed, dot, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same numbers) with the fused backward above when eager."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)
        return _RMSNorm.apply(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE pairs dimension i with i + head_dim/2 (HF's layout, not the interleaved original)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x·cos + sign·rotate_half(x)·sin, written half by half (both halves of the tables are equal)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None  # a rotation's transpose turns the other way


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [..., T, head_dim] with tables [T, head_dim] in the ``rotate_half`` layout."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():
        return x * cos + rotate_half(x) * sin
    return _Rope.apply(x, cos, sin)
