"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
``layers.i.self_attn.q_proj``, ...) and RoPE uses the same ``rotate_half`` layout, so export and import
are a rename of the ``model.`` prefix, never a permutation. The model knows nothing of parallelism:
``train/parallelize.py`` applies checkpointing, compile and sharding from outside.

Presets (shapes only; the run sets ``vocab_size`` and ``eos_id`` from its tokenizer). "Body" is the
blocks plus the final norm; the head columns add the output projection at two vocabularies (the
FLOP-counted N of ``flops_per_token`` is body + head; the input embedding is a lookup):

| preset | dim  | layers | heads q/kv | ffn  | body   | + head @ 8192 | + head @ 50304 | shape of          |
|--------|------|--------|------------|------|--------|---------------|----------------|-------------------|
| tiny   | 64   | 2      | 4/2        | 192  | 0.1M   | 0.6M          | 3.3M           | tests             |
| 20M    | 384  | 12     | 6/6        | 1024 | 21.2M  | 24.4M         | 40.6M          | data ablations    |
| 60M    | 640  | 12     | 10/10      | 1728 | 59.5M  | 64.7M         | 91.7M          | data ablations    |
| 124M   | 768  | 12     | 12/12      | 2048 | 85.0M  | 91.2M         | 123.6M         | GPT-2 small       |
| 350M   | 1024 | 24     | 16/16      | 2752 | 303.6M | 312.0M        | 355.1M         | GPT-2 medium      |
| 1B     | 2048 | 16     | 32/8       | 8192 | 973.1M | 989.9M        | 1076.2M        | Llama-3.2-1B      |

20M and 60M are named by their body (at tokenmill's default 8192-token vocabulary the head adds
little); 124M and 350M by body + head at GPT-2's padded 50304, GPT-2's own (tied) count. The SwiGLU
width 8/3·dim (rounded up to 64) keeps each block at GPT-2's 12·dim² parameters. 1B is Llama-3.2-1B
exactly: GQA 32/8, ffn 8192, tied embeddings, RoPE base 500000 (1.24B with its 128k vocabulary).
All use head_dim 64, RMSNorm, RoPE and SwiGLU with no biases, as the Llama family does.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tokenmill.model.masking import AttentionMask, attend, build_document_mask
from tokenmill.model.eager_ops import RMSNorm, apply_rope
from tokenmill.model.head_loss import linear_cross_entropy
from tokenmill.tokens.corruption import MaskingConfig, SpanCorruptionConfig

# The table in the module docstring gives each shape's parameter counts.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "20M": dict(dim=384, n_layers=12, n_heads=6, max_seq_len=1024),
    "60M": dict(dim=640, n_layers=12, n_heads=10, max_seq_len=1024),
    "124M": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, tie_embeddings=True,
               rope_theta=500000.0, max_seq_len=2048),
}


class GrowConfig(BaseModel):
    """How ``ModelConfig.grow_from`` is stacked (G_stack, Du et al. 2024)."""

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(
        2, ge=2, description="Growth factor g: the new model has g× the source's layers (model.n_layers must be "
        "exactly that); layer i copies source layer i mod its n_layers."
    )


class ElectraConfig(BaseModel):
    """ELECTRA (Clark et al. 2020): a small masked-LM generator fills the masked positions, the discriminator
    (the model kept) tells replaced tokens from original ones. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    generator_size: float = Field(0.25, gt=0, le=1, description="Generator width (dim and heads) as a share of the "
                                  "discriminator's, same depth (the paper: 1/4 to 1/2 works best).")
    discriminator_weight: float = Field(50.0, gt=0, description="Weight of the replaced-token loss beside the "
                                        "generator's MLM loss (lambda).")


class ModelConfig(BaseModel):
    """The decoder's shape. Unset ``n_kv_heads`` and ``ffn_hidden`` are resolved on validation, so a
    dumped config always spells out the exact architecture."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny", "20M", "60M", "124M", "350M", "1B"] | None = Field(
        None, description="Named shape; fills the shape fields, explicit fields override it."
    )
    vocab_size: int = Field(
        50304, gt=0, description="Tokenizer vocabulary size (set by the run from the tokenizer)."
    )
    pad_vocab_to: int = Field(
        64, gt=0, description="Embedding rows are padded up to a multiple of this (faster matmuls)."
    )
    dim: int = Field(768, gt=0, description="Hidden size (width of the residual stream).")
    n_layers: int = Field(12, gt=0, description="Number of transformer blocks.")
    n_heads: int = Field(12, gt=0, description="Number of query heads; head_dim = dim / n_heads.")
    n_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads for grouped-query attention; default n_heads (MHA)."
    )
    ffn_hidden: int | None = Field(
        None, gt=0, description="SwiGLU hidden size; default 8/3·dim rounded up to a multiple of 64."
    )
    max_seq_len: int = Field(1024, gt=0, description="Longest sequence the RoPE tables cover.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of every weight matrix.")
    eos_id: int | None = Field(
        None, ge=0, description="End-of-document token id (set by the run); needed for document masking."
    )
    pad_id: int | None = Field(
        None, ge=0, description="Padding token id (set by the run for span_corruption, whose inputs vary in length)."
    )
    init_from: str | None = Field(
        None,
        description="Continue pretraining a local Hugging Face Llama-family checkpoint folder: its config.json "
        "sets the shape (the shape fields here are replaced) and its weights the starting point; the run "
        "then uses its tokenizer.",
    )
    grow_from: str | None = Field(
        None,
        description="Start from a smaller trained model stacked in depth (needs grow): a tokenmill run folder (its "
        "model/ export, else its newest checkpoint) or a local Hugging Face Llama folder. Its shape must equal "
        "this one's but for n_layers; embeddings, norms and head are copied. The run must use its tokenizer.",
    )
    grow: GrowConfig | None = Field(None, description="How grow_from is stacked; set both or neither.")
    objective: Literal["clm", "mlm", "electra", "span_corruption"] = Field(
        "clm", description="clm: this decoder, next-token loss. mlm: a bidirectional encoder, masked tokens. "
        "electra: generator + discriminator encoders, replaced-token detection. span_corruption: an "
        "encoder-decoder on T5/UL2 denoising.")
    masking: MaskingConfig | None = Field(None, description="mlm and electra: which tokens are masked (default "
                                          "settings when null).")
    span_corruption: SpanCorruptionConfig | None = Field(None, description="span_corruption: the denoisers "
                                                         "(default T5's when null).")
    electra: ElectraConfig | None = Field(None, description="electra: generator size and loss weight (the "
                                          "paper's when null).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _resolve_shape(self) -> "ModelConfig":
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        return self

    @model_validator(mode="after")
    def _one_starting_point(self) -> "ModelConfig":
        if (self.grow_from is None) != (self.grow is None):
            raise ValueError("grow_from and grow go together: grow_from names the smaller model, grow how to stack it")
        if self.grow_from and self.init_from:
            raise ValueError("init_from and grow_from are two starting points: set one")
        return self

    @model_validator(mode="after")
    def _objective_settings(self) -> "ModelConfig":
        """Each objective's settings filled with their defaults, and refused where they do not apply."""
        wanted = {"masking": self.objective in ("mlm", "electra"), "span_corruption": self.objective == "span_corruption",
                  "electra": self.objective == "electra"}
        defaults = {"masking": MaskingConfig, "span_corruption": SpanCorruptionConfig, "electra": ElectraConfig}
        for name, needed in wanted.items():
            if getattr(self, name) is not None and not needed:
                raise ValueError(f"model.{name} does not apply to objective {self.objective}")
            if needed and getattr(self, name) is None:
                setattr(self, name, defaults[name]())
        if self.objective != "clm" and (self.init_from or self.grow_from):
            raise ValueError(f"objective {self.objective} trains from scratch: init_from and grow_from load decoders")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return self.pad_vocab_to * math.ceil(self.vocab_size / self.pad_vocab_to)


def rope_angles(cfg: ModelConfig) -> torch.Tensor:
    """[max_seq_len, head_dim] RoPE angles in fp32, in the ``rotate_half`` layout (each frequency twice),
    the numbers Hugging Face's Llama and ModernBERT compute."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """``mask``: None (plain causal) or the document mask ``Llama.forward`` built for every layer."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, residual output projections scaled by 1/sqrt(2·n_layers)
        (GPT-2) so the residual stream's variance does not grow with depth; RoPE tables in fp32.
        Separate from ``__init__`` so a model built on the meta device can be materialised later."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)
        angles = rope_angles(self.cfg).to(self.rope_cos.device)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_mask: bool = False,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, padded_vocab] for token ids ``idx`` [B, T]; with ``targets`` [B, T] instead
        ``(None, loss)``, the cross-entropy in fp32 (targets of -1 are ignored): the mean, or with
        ``reduction="none"`` per token [B, T] (0 where ignored), which per-domain losses need. With targets
        the logits are never materialised whole (``head_loss``: the head's fused, chunked loss).
        ``doc_mask`` stops attention across ``cfg.eos_id`` boundaries: a FlexAttention block mask on CUDA,
        a dense mask for SDPA elsewhere (``model/masking.py``), built here once for all layers, outside
        per-block graphs."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if doc_mask:
            if self.cfg.eos_id is None:
                raise ValueError("doc_mask needs ModelConfig.eos_id")
            mask = build_document_mask(idx, self.cfg.eos_id)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        hidden = self.norm(x)
        if targets is None:
            return self.lm_head(hidden)
        token_loss = linear_cross_entropy(hidden, self.lm_head.weight, targets)
        if reduction == "none":
            return None, token_loss
        return None, token_loss.sum() / (targets >= 0).sum()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; ``exclude_embedding`` drops the input embedding table (a lookup, not a
        matmul) but keeps the output head, which is what FLOP counts need."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6·N for the matmul weights plus 12·L·dim·T
        for attention scores and values (the PaLM / nanoGPT convention; it counts the full T×T
        product even though causal kernels skip half, so MFU stays comparable with those)."""
        return 6 * self.num_params(exclude_embedding=True) + 12 * self.cfg.n_layers * self.cfg.dim * seq_len
