"""Model growth by depth stacking: G_stack (Du et al. 2024, "Stacking Your Transformers: A Closer Look at
Model Growth for Efficient LLM Pre-Training").

A trained model of L blocks starts one of g·L blocks: the whole stack of blocks is repeated g times, so
block i of the new model is a copy of block i mod L (the paper's G_direct↑ stacking, M ∘ M ∘ ... ∘ M,
not each block repeated in place); embeddings, final norm and head are copied once. The new model then
computes exactly the small model's body run g times in a row. Where the small model comes from (a
Hugging Face folder or a tokenmill run) is ``tokenmill.train.sources``'s business.
"""

from __future__ import annotations


import torch

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama

# Everything but n_layers that decides a weight's shape or what the copied weights compute.
SHAPE_FIELDS = ("dim", "n_heads", "n_kv_heads", "ffn_hidden", "padded_vocab_size", "tie_embeddings",
                "rope_theta", "norm_eps")


@torch.no_grad()
def stack(model: Llama, small: Llama, depth: int) -> None:
    """Copy ``small`` into ``model``, its blocks repeated ``depth`` times in order. Refuses a ``small``
    whose shape differs in anything but n_layers, or a ``model`` without depth × its layers."""
    mismatched = [f"{f}: {getattr(small.cfg, f)} in grow_from, {getattr(model.cfg, f)} in model"
                  for f in SHAPE_FIELDS if getattr(small.cfg, f) != getattr(model.cfg, f)]
    if mismatched:
        raise TokenmillError(f"model.grow_from must have the model's shape but for n_layers; "
                             f"it differs in {'; '.join(mismatched)}")
    n_small = small.cfg.n_layers
    if model.cfg.n_layers != depth * n_small:
        raise TokenmillError(f"model.n_layers={model.cfg.n_layers} but model.grow.depth={depth} × grow_from's "
                             f"{n_small} layers = {depth * n_small}: set n_layers to {depth * n_small}")
    source = small.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"layers.{int(i) % n_small}.{rest}"
        tensor.copy_(source[name])
