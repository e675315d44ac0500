"""AdamW with nanoGPT's weight-decay split: decay every ≥2-D weight (matmuls and embeddings), never
norm gains or biases, whose scale is not a capacity to regularise."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.train.config import TrainConfig


def build_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The fused CUDA kernel does the whole update in a few launches; elsewhere use the default
    (foreach) implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda"
    )
