"""The output head and its cross-entropy as one chunked operation, for eager training.

Eagerly, ``F.cross_entropy(F.linear(h, W))`` writes the [tokens, vocab] logits, reads and writes them
again for the log-softmax, again for its backward and once more to zero the gradient buffer: on a CPU,
at a 8192-token vocabulary, those memory-bound passes cost more than a third of a small model's step.
Here each chunk of rows has its logits computed, turned into the loss and into the gradient of the
loss with respect to the logits (softmax minus one-hot) while the chunk is still in cache. Only that
gradient is kept for the backward pass, which is then just its two matmuls, with the upstream per-token
weights folded into the small side (the hidden states, or the rows of the result). The loss is
per token, so the trainer's per-sequence and per-domain weighting still apply.

Only the CPU takes the chunked path. On a GPU the passes are cheap beside the launches a chunk loop
would add, and under ``torch.compile`` the compiler fuses the plain formula itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk: 256 rows of an 8192-token vocabulary are 8 MiB of fp32 logits, about what a core's share
# of the last-level cache keeps hot; the exact value moves the step by a few percent at most.
CHUNK_ELEMENTS = 1 << 21

# The gradient buffer of the last backward pass, by (shape, dtype, device). A fresh [tokens, vocab] tensor is
# tens of MiB, which the C allocator maps afresh every step, paying a page fault per 4 KiB on first touch
# (~25 ms for 64 MiB on a 2-core machine); reusing it once nothing else holds it costs nothing.
_spare: dict[tuple, torch.Tensor] = {}


def _gradient_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (shape, dtype, device)
    spare = _spare.get(key)
    if spare is not None and spare._use_count() == 1:  # only this cache holds it: its last backward is over
        return spare
    _spare.clear()  # one buffer at a time, for the shape in use now
    _spare[key] = buffer = torch.empty(shape, dtype=dtype, device=device)
    return buffer


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        keep_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        grad_logits = _gradient_buffer((n, vocab), dtype, hidden.device) if keep_grad else \
            torch.empty(min(n, chunk), vocab, dtype=dtype, device=hidden.device)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            out = grad_logits[rows] if keep_grad else grad_logits[: rows.stop - rows.start]
            torch.mm(h[rows], w.t(), out=out)
            logits = out.float() if out.dtype != torch.float32 else out
            picked = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # one exponential per logit, in place
            total = exp.sum(dim=1, keepdim=True)
            lse = (peak + total.log()).squeeze(1)
            loss[rows] = torch.where(valid[rows], lse - picked, 0.0)
            if keep_grad:  # softmax - one_hot(target), written over the logits (ignored rows: see backward)
                probs = exp.div_(total)
                probs.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(total))
                if probs is not out:
                    out.copy_(probs)
        if keep_grad:
            ctx.save_for_backward(h, w, grad_logits, valid)
            ctx.weight_dtype = weight.dtype
            ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, w, grad_logits, valid = ctx.saved_tensors
        scale = (grad_loss * valid).to(grad_logits.dtype)[:, None]  # an ignored token's loss is a constant 0
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (torch.mm(grad_logits, w) * scale).to(ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_logits.t(), h * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 of ``hidden @ weight.T`` against ``targets`` (same leading shape as
    ``hidden``'s; -1 is ignored and scores 0), without keeping the logits."""
    lead = targets.shape
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.compiler.is_compiling() or hidden.device.type != "cpu":
        logits = F.linear(flat, weight)
        loss = F.cross_entropy(logits.float(), flat_targets, ignore_index=-1, reduction="none")
    else:
        loss = _LinearCrossEntropy.apply(flat, weight, flat_targets)
    return loss.view(lead)
