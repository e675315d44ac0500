"""Make the plain model train fast and big, from outside: activation checkpointing, compile, FSDP2.

The order is torchtitan's. Checkpointing wraps each block first, so compile sees the wrapped blocks
and fuses the recomputation too; FSDP2 shards last, so its all-gather and reduce-scatter hooks sit
around the compiled blocks rather than inside a graph. Parameter names do not change: checkpoints and
the Hugging Face export read the same keys whatever was applied.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tokenmill.model.llama import Llama
from tokenmill.train.config import TrainConfig

# What op-level selective checkpointing keeps: the expensive outputs. Everything else in a block
# (norms, SiLU, RoPE, residual adds) is cheap elementwise work, recomputed in the backward pass.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,  # document-masked attention on CUDA (model/masking.py)
}


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Llama, mode: str, selective_ac: int | str) -> None:
    """Wrap blocks in place: all of them ('full'), every ``selective_ac``-th one, or all of them with
    the op-level policy (``selective_ac == 'op'``). No dropout, so no RNG state needs replaying."""
    for i, block in enumerate(model.layers):
        if mode == "selective" and selective_ac == "op":
            context_fn = partial(create_selective_checkpoint_contexts, _save_matmuls_and_attention)
            model.layers[i] = checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
        elif mode == "full" or (mode == "selective" and i % selective_ac == 0):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Llama, per_block: bool) -> None:
    """Alone on a device, one graph for the whole model fuses the most (the output head with the fp32
    cross-entropy included). Sharded, each block gets its own graph, compiled once and reused by its
    identical siblings, with FSDP2's hooks between graphs."""
    if per_block:
        for block in model.layers:
            block.compile(fullgraph=True)
    else:
        model.compile()


def apply_fsdp(model: Llama, mesh: DeviceMesh, bf16: bool) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, head). In bf16 the gathered parameters
    are bf16 while gradients are reduced in fp32 and the sharded master weights stay fp32. The last
    block stays gathered after its forward: backward needs it straight away."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(model: Llama, cfg: TrainConfig, mesh: DeviceMesh | None, *, bf16: bool = False) -> Llama:
    """Apply ``cfg``'s activation checkpointing and compile, and shard over ``mesh`` (None: one
    process, no sharding). Changes ``model`` in place and returns it; call before building the
    optimizer, which must see the sharded parameters."""
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.selective_ac)
    if cfg.compile:
        apply_compile(model, per_block=mesh is not None)
    if mesh is not None:
        apply_fsdp(model, mesh, bf16)
    return model
