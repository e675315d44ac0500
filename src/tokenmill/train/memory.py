"""Where a run's memory goes, counted from the tensors themselves: parameters, gradients and optimizer
state (this rank's shards under FSDP2), and the process's peak (CUDA's max allocated, or peak RSS on
CPU). Measured once, after the first optimizer step, when every gradient and every state tensor exists.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``' storages, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in tensors:
        t = _local(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer keeps between steps (moments, momentum buffers, projections)."""
    return [v for state in optimizer.state.values() for v in _tensors(state)]


def _tensors(node: Any) -> Iterable[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        if node.dim() > 0:  # 0-d step counters are bookkeeping, not state worth counting
            yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tensors(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _tensors(value)


def measure(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes now; call it between ``step()`` and ``zero_grad()``."""
    params = list(model.parameters())
    return {
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_state_bytes": tensor_bytes(optimizer_state_tensors(optimizer)),
    }


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """The process's peak memory on ``device`` and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.exists():  # VmHWM: this process's own peak RSS (ru_maxrss may carry a parent's over exec)
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) * 1024, "cpu_peak_rss"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "cpu_peak_rss"


# ---- prediction, before anything is allocated -------------------------------------------------------
def _block_matrices(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every 2-D weight inside the transformer blocks: what Muon, GaLore and SLTrain treat."""
    return [tuple(p.shape) for p in model.layers.parameters() if p.dim() == 2]


def _galore_state(m: int, n: int, cfg) -> int:
    """Elements GaLore keeps for one m×n matrix: two projected moments and the projector."""
    r = min(cfg.rank, m, n)
    rows = cfg.proj_type == "left" or (cfg.proj_type == "std" and m <= n)  # project the shorter side
    return 2 * r * (n if rows else m) + r * (m if rows else n)


def predict(model_cfg, train_cfg, micro_batch: int | None = None, world_size: int = 1) -> dict[str, int]:
    """Bytes per device of parameters, gradients, optimizer state and activations of a run, from its
    configs alone (the model is built on the meta device). Parameters, gradients and state are exact for
    fp32 master weights (FSDP2 shards them ``world_size`` ways), but for GaLore's per-layer updates, whose
    gradient bytes are the largest single gradient, alive during backward (a run counts none at rest);
    activations are an estimate of what the backward pass keeps in eager PyTorch, so the measured peak in
    summary.json is the figure to trust."""
    from tokenmill.model.build import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    opt = train_cfg.optimizer
    total = sum(p.numel() for p in model.parameters())
    blocks = _block_matrices(model)
    block_elements = sum(m * n for m, n in blocks)
    trainable = total
    if opt.name == "sltrain":
        low_rank = sum(min(opt.rank, m, n) * (m + n) + round(opt.density * m * n) for m, n in blocks)
        trainable = total - block_elements + low_rank
    replicated = 0  # GaLore's projected block state is the same on every rank (see train/galore.py)
    if opt.name == "muon":  # one momentum buffer per block matrix, AdamW's two moments elsewhere
        state = block_elements + 2 * (total - block_elements)
    elif opt.name == "galore":
        state, replicated = 2 * (total - block_elements), sum(_galore_state(m, n, opt) for m, n in blocks)
    else:
        state = 2 * trainable
    memory = {"param_bytes": 4 * trainable, "grad_bytes": 4 * trainable, "optimizer_state_bytes": 4 * state}
    memory = {k: -(-v // world_size) for k, v in memory.items()}
    memory["optimizer_state_bytes"] += 4 * replicated
    if getattr(opt, "per_layer_update", False):  # one gradient at a time, freed as its parameter steps
        memory["grad_bytes"] = 4 * max(p.numel() for p in model.parameters())
    memory["activation_bytes"] = _activations(model_cfg, train_cfg, micro_batch or train_cfg.micro_batch_size)
    memory["total_bytes"] = sum(memory.values())
    return memory


def _activations(model_cfg, train_cfg, micro_batch: int) -> int:
    """What autograd keeps for one micro-batch: per layer and token the block's inputs, norms, q/k/v,
    attention output and the SwiGLU's three hidden vectors (on CPU, where SDPA takes its math path, also
    the attention probabilities; CUDA's fused kernels keep none); with full activation checkpointing only
    each block's input, plus one block recomputed. The logits' gradient in fp32 (on CPU the fused head,
    ``model/head_loss.py``, keeps nothing else of them; elsewhere also the log-softmax)."""
    from tokenmill.train.device import resolve_device, uses_bf16

    c, t = model_cfg, train_cfg.seq_len
    device = resolve_device(train_cfg.device)
    width = 2 if uses_bf16(train_cfg.dtype, device) else 4
    kv = c.n_kv_heads * c.head_dim
    probs = c.n_heads * t if device.type == "cpu" else 0
    per_token_layer = 8 * c.dim + 2 * kv + 4 * c.ffn_hidden + probs
    layers = (c.n_layers * c.dim + per_token_layer if train_cfg.activation_checkpointing == "full"
              else c.n_layers * per_token_layer)
    tokens = micro_batch * t
    return width * tokens * layers + 4 * tokens * c.padded_vocab_size * (1 if device.type == "cpu" else 2)
