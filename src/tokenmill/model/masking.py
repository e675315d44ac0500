"""Document masking for causal attention: which kernel runs it, and the mask each kernel reads.

Packed training windows hold several documents; with ``train.doc_mask`` a token attends only to earlier
tokens of its own document. An EOS token closes its document, so the token after it starts a fresh
context. Two ways to run that, chosen by device (``attention_backend``):

* ``"flex"`` (CUDA): FlexAttention with a ``BlockMask`` built from ``causal & same document``. The
  kernel skips blocks that are fully masked and never materialises a [T, T] mask, so document masking
  costs about what plain causal attention does (less, the shorter the documents). FlexAttention is only
  fast compiled: outside a compiled graph ``attend`` calls one module-level ``torch.compile(flex_attention)``,
  made on first use (as torchtitan does); inside one (``train/parallelize.py`` compiles each block, or the
  whole model) it calls ``flex_attention`` itself and the enclosing graph lowers it. ``Llama.forward``
  builds the block mask once, outside the per-block graphs, with a compiled ``create_block_mask``, and
  hands it to every layer; a whole-model graph breaks there (``document_block_mask``).
* ``"sdpa"`` (CPU and anything else): a dense boolean [B, 1, T, T] mask for
  ``F.scaled_dot_product_attention``. On GPU an explicit mask would take SDPA off its flash kernel and
  cost O(T²) memory. On CPU (torch 2.13) FlexAttention has no backward at all, runs uncompiled as an
  unfused reference and costs half a minute to compile, while a CPU-sized window's dense mask is cheap.

Without document masking the models pass no mask at all and SDPA runs its causal flash path everywhere.
Nothing here knows ``ModelConfig``: the functions take token ids and the EOS id.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Backend = Literal["sdpa", "flex"]
# None: choose by device (CUDA -> flex, else sdpa). Tests set it to run one backend on any device.
FORCE_BACKEND: Backend | None = None
# What a model passes to each attention layer: nothing (plain causal), a dense mask, or a block mask.
AttentionMask = torch.Tensor | BlockMask | None

_compiled: dict[str, Callable] = {}


def attention_backend(device: torch.device | str) -> Backend:
    """The kernel document masking uses on ``device``: ``FORCE_BACKEND`` when set, else flex on CUDA and
    sdpa (a dense mask) elsewhere."""
    if FORCE_BACKEND is not None:
        return FORCE_BACKEND
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def document_ids(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] index of each token's document within its row: 0 up to and including the first EOS, 1 after
    it, and so on (the EOS belongs to the document it closes)."""
    is_eos = (idx == eos_id).int()
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_mask(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask: causal and within one document (True: may attend). For SDPA."""
    doc = document_ids(idx, eos_id)
    same_doc = doc[:, :, None] == doc[:, None, :]
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return (same_doc & causal).unsqueeze(1)


def document_mask_mod(doc: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod`` for document ids ``doc`` [B, T]: query ``q`` of row ``b`` may attend to
    key ``kv`` when ``kv <= q`` and both lie in one document. Every head alike."""

    def causal_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return causal_same_document


def _maybe_compiled(name: str, fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled once per process on CUDA (made on first use); ``fn`` itself inside a graph being
    compiled (the enclosing graph traces it) and on other devices (a reference path for tests)."""
    if torch.compiler.is_compiling() or device.type != "cuda":
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


@torch.compiler.disable
def document_block_mask(idx: torch.Tensor, eos_id: int) -> BlockMask:
    """FlexAttention ``BlockMask`` of ``document_mask``'s pattern for token ids ``idx`` [B, T], one head
    dimension broadcast over all heads.

    Never traced into a caller's graph: when the whole model is compiled, its graph breaks here and the
    mask is built by the separately compiled ``create_block_mask`` (on CUDA), then enters the rest of the
    model's graph as an input, as it enters each block's graph when blocks are compiled one by one.
    Traced inline, the mask_mod would read an intermediate of the graph, which inductor's CPU FlexAttention
    lowering refuses."""
    B, T = idx.shape
    build = _maybe_compiled("create_block_mask", create_block_mask, idx.device)
    return build(document_mask_mod(document_ids(idx, eos_id)), B, None, T, T, device=idx.device)


def build_document_mask(idx: torch.Tensor, eos_id: int, backend: Backend | None = None) -> torch.Tensor | BlockMask:
    """The document mask for ``idx`` [B, T] in the form ``backend`` (default: ``attention_backend`` of
    ``idx``'s device) reads: a dense mask for sdpa, a ``BlockMask`` for flex. Build it once per forward
    and pass it to every layer."""
    backend = backend or attention_backend(idx.device)
    if backend == "flex":
        return document_block_mask(idx, eos_id)
    return document_mask(idx, eos_id)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] over k, v [B, Hkv, T, D] (Hq a multiple of Hkv: grouped-query
    attention), softmax scale 1/sqrt(D). ``mask``: None for plain causal (SDPA's flash path), a dense
    boolean mask (SDPA) or a ``BlockMask`` (FlexAttention), as ``build_document_mask`` makes them."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        flex = _maybe_compiled("flex_attention", flex_attention, q.device)
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
