"""A T5 v1.1-layout encoder-decoder in plain PyTorch, for ``model.objective: span_corruption``.

Raffel et al. 2020 (T5) with the v1.1 changes: no dropout, untied input embedding and output head, a
gated feed-forward. The layout is Hugging Face's ``T5ForConditionalGeneration`` so that the export
(``model/hf_seq2seq.py``) is a rename of keys, never a change of arithmetic:

* T5LayerNorm is RMSNorm (scale only, no mean, no bias), applied before each sub-layer;
* attention has no 1/sqrt(head_dim) scaling: T5 folds it into the query's initialisation instead,
  and so does ``init_weights`` here;
* positions enter only as a learned per-head bias on the attention scores, looked up by a log-bucketed
  relative distance (32 buckets up to 128 tokens): bidirectional buckets in the encoder, causal ones in
  the decoder; cross-attention has no position bias. T5 keeps the table in its first block and hands
  the computed bias on to every later block; here each stack's table sits on the model and the bias
  is computed once per forward, which is the same arithmetic but keeps all blocks of a stack
  identical (one compiled graph for all of them; Muon and SLTrain, which act on ``layers``' matrices,
  do not mistake the small lookup table for a projection);
* the feed-forward is ``feed_forward_proj="gated-silu"``, HF's SwiGLU: down(silu(gate(x)) · up(x)),
  the decoder's MLP exactly, so the same module is reused.

The blocks of both stacks live in one ``layers`` ModuleList, encoder first: ``train/parallelize.py``
wraps, compiles and shards each element of ``model.layers`` in place, and ``forward`` reads the blocks
back through that list, so whatever was applied runs. ``n_layers`` is the depth of *each* stack, as
HF's ``num_layers``/``num_decoder_layers``; fields of ``ModelConfig`` that a T5 does not have are not
used (``n_kv_heads``: T5 attention has as many key/value heads as query heads; ``max_seq_len`` and
``rope_theta``: there is no absolute position or RoPE table).

``tie_embeddings`` is honoured the way HF's T5 reads ``tie_word_embeddings=True`` (the original T5):
the head shares the embedding and the decoder output is scaled by dim**-0.5 before it; untied (the
default, v1.1) there is no such rescaling.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.llama import MLP, ModelConfig

# T5's relative-position buckets: half exact distances, half log-spaced up to MAX_DISTANCE, beyond which
# every distance shares the last bucket (so the model runs at any length it was not trained on).
NUM_BUCKETS = 32
MAX_DISTANCE = 128


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = NUM_BUCKETS,
    max_distance: int = MAX_DISTANCE,
) -> torch.Tensor:
    """Bucket of each ``key_position - query_position``, HF's ``T5Attention._relative_position_bucket``.

    Bidirectional (encoder): half the buckets for keys before the query, half for keys after. Causal
    (decoder): keys after the query cannot be attended, so they all fall into bucket 0 with distance 0.
    The log is taken of the distance clamped to ``max_exact``, which changes nothing where it is used
    (large distances) but avoids log(0) on the small ones, which HF leaves to ``torch.where`` to discard.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """One stack's learned bias per (head, relative-distance bucket), added to every block's
    self-attention scores. ``weight`` is HF's ``relative_attention_bias.weight`` [buckets, heads]."""

    def __init__(self, n_heads: int, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(NUM_BUCKETS, n_heads))

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """The bias [1, heads, q_len, k_len]."""
        pos_q = torch.arange(q_len, device=self.weight.device)[:, None]
        pos_k = torch.arange(k_len, device=self.weight.device)[None, :]
        buckets = relative_position_bucket(pos_k - pos_q, self.bidirectional)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


def shift_right(targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Decoder inputs from targets [B, Ld]: T5's ``_shift_right`` with ``decoder_start_token_id = pad_id``.
    Position t sees the targets before t; ignored targets (-1) are fed as ``pad_id``."""
    shifted = torch.full_like(targets, pad_id)
    shifted[:, 1:] = targets[:, :-1]
    return shifted.masked_fill(shifted == -1, pad_id)


def masked_value(dtype: torch.dtype) -> float:
    """The additive score of a masked key: half the dtype's most negative number, so that adding a
    position bias cannot overflow to -inf (HF uses the minimum itself), and a row whose keys are all
    masked (an all-padding input) attends uniformly instead of producing NaN. Half the float32 minimum
    is still finite in bfloat16, which autocast may cast the mask to."""
    return torch.finfo(dtype).min / 2


class Attention(nn.Module):
    """Multi-head attention without score scaling (T5): self-attention when ``kv`` is ``x``,
    cross-attention over the encoder output otherwise. ``bias`` is additive: position bias plus
    masks, [B or 1, heads or 1, Lq, Lk]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.k_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, Lq, _ = x.shape
        Lk = kv.shape[1]
        q = self.q_proj(x).view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(B, Lk, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(B, Lk, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, Lq, -1))


class EncoderBlock(nn.Module):
    """norm → bidirectional self-attention → residual; norm → gated FFN → residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, h, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBlock(nn.Module):
    """norm → causal self-attention → residual; norm → cross-attention over the encoder output →
    residual; norm → gated FFN → residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_attn_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, enc: torch.Tensor, self_bias: torch.Tensor,
                cross_bias: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, h, self_bias)
        x = x + self.cross_attn(self.cross_attn_layernorm(x), enc, cross_bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderDecoder(nn.Module):
    """Span-corruption model: the encoder reads the corrupted input, the decoder writes the targets.

    ``layers`` holds the ``cfg.n_layers`` encoder blocks followed by the ``cfg.n_layers`` decoder blocks.
    ``pad_id`` is the padding token of the encoder input (masked as a key everywhere) and the decoder's
    start token, as in T5.
    """

    def __init__(self, cfg: ModelConfig, *, pad_id: int):
        super().__init__()
        if not 0 <= pad_id < cfg.padded_vocab_size:
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary of {cfg.padded_vocab_size} rows")
        self.cfg, self.pad_id, self.n_encoder_layers = cfg, pad_id, cfg.n_layers
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.encoder_position_bias = RelativePositionBias(cfg.n_heads, bidirectional=True)
        self.decoder_position_bias = RelativePositionBias(cfg.n_heads, bidirectional=False)
        self.layers = nn.ModuleList(
            [EncoderBlock(cfg) for _ in range(cfg.n_layers)] + [DecoderBlock(cfg) for _ in range(cfg.n_layers)]
        )
        self.encoder_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.decoder_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights as the decoder's (not T5's unit-std embedding and head, whose
        initial logits have std sqrt(dim) when untied), so one init_std and lr serve every objective.
        Two T5-specific scalings keep the activations at the decoder's scale:

        * ``q_proj`` by 1/sqrt(head_dim), the attention scaling T5 leaves out of the forward pass (Mesh
          TensorFlow's T5 puts it into the query's init), so initial scores are as a scaled decoder's;
        * residual outputs (``o_proj`` of both attentions, ``down_proj``) by 1/sqrt(number of residual
          branches in the stack: 2 per encoder block, 3 per decoder block), GPT-2's depth scaling.

        Norm gains are ones. Separate from ``__init__`` so a meta-device model can be materialised."""
        std, n = self.cfg.init_std, self.cfg.n_layers
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # only inside layers.<i>.
                branches = (2 if int(name.split(".")[1]) < n else 3) * n
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(branches))
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(self.cfg.head_dim))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def _pad_bias(self, enc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive key mask [B, 1, 1, Le]: padding positions of the encoder input are never attended."""
        pad = (enc_ids == self.pad_id)[:, None, None, :]
        return torch.zeros(pad.shape, dtype=dtype, device=enc_ids.device).masked_fill(pad, masked_value(dtype))

    def encode(self, enc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output [B, Le, dim] (after its final norm) and the key mask the decoder's
        cross-attention needs."""
        x = self.embed_tokens(enc_ids)
        pad_bias = self._pad_bias(enc_ids, x.dtype)
        Le = enc_ids.shape[1]
        bias = self.encoder_position_bias(Le, Le).to(x.dtype) + pad_bias
        for block in self.layers[: self.n_encoder_layers]:
            x = block(x, bias)
        return self.encoder_norm(x), pad_bias

    def decode(self, dec_ids: torch.Tensor, enc: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
        """Logits [B, Ld, padded_vocab] for decoder inputs ``dec_ids`` (already shifted right)."""
        y = self.embed_tokens(dec_ids)
        Ld = dec_ids.shape[1]
        causal = torch.full((Ld, Ld), masked_value(y.dtype), dtype=y.dtype, device=y.device).triu(1)
        bias = self.decoder_position_bias(Ld, Ld).to(y.dtype) + causal
        for block in self.layers[self.n_encoder_layers:]:
            y = block(y, enc, bias, pad_bias)
        y = self.decoder_norm(y)
        if self.cfg.tie_embeddings:  # HF's T5 with tie_word_embeddings=True (original T5)
            y = y * self.cfg.dim**-0.5
        return self.lm_head(y)

    def forward(
        self, enc_ids: torch.Tensor, targets: torch.Tensor, reduction: Literal["mean", "none"] = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, Ld, padded_vocab] and the fp32 cross-entropy for corrupted inputs ``enc_ids``
        [B, Le] and ``targets`` [B, Ld] (-1: padding, ignored): the mean over the targets that count,
        or with ``reduction="none"`` per target token [B, Ld], 0 where ignored. The decoder reads the
        targets shifted right behind ``pad_id`` (teacher forcing)."""
        enc, pad_bias = self.encode(enc_ids)
        logits = self.decode(shift_right(targets, self.pad_id), enc, pad_bias)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction=reduction)
        return logits, loss.view_as(targets) if reduction == "none" else loss

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; ``exclude_embedding`` drops the lookups (the token embedding unless tied to
        the head, and the two position-bias tables) and keeps the output head, as FLOP counts need."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.encoder_position_bias.weight.numel() + self.decoder_position_bias.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.embed_tokens.weight.numel()
        return n

    def _matmul_params(self) -> tuple[int, int]:
        """Weights applied once per encoder position and once per decoder position, from the shape
        (so checkpoint wrappers, FSDP and SLTrain's factors do not change the count). Cross-attention's
        key and value projections read the encoder output, so they count per encoder position."""
        d, f, L = self.cfg.dim, self.cfg.ffn_hidden, self.cfg.n_layers
        attn, mlp = 4 * d * d, 3 * d * f
        per_input = L * (attn + mlp + d + d) + d + L * 2 * d * d  # encoder blocks, final norm; cross k, v
        per_target = L * (attn + 2 * d * d + mlp + 3 * d) + d + d * self.cfg.padded_vocab_size
        return per_input, per_target

    def flops_per_example(self, input_len: int, target_len: int) -> float:
        """Training FLOPs (forward + backward) of one (input, target) pair: 6·N per position for the
        weights each position passes through, plus the nanoGPT/PaLM attention term 12·layers·dim per
        (query, key) pair, full products counted: Le² encoder, Ld² decoder self, Ld·Le cross."""
        per_input, per_target = self._matmul_params()
        attn = 12 * self.cfg.n_layers * self.cfg.dim * (input_len**2 + target_len**2 + target_len * input_len)
        return 6 * per_input * input_len + 6 * per_target * target_len + attn

    def flops_per_token(self, seq_len: int, target_len: int | None = None) -> float:
        """Training FLOPs per encoder input position: ``flops_per_example(seq_len, target_len) / seq_len``.
        An input of ``seq_len`` positions is made from about ``seq_len`` tokens of the corpus, so this is
        comparable with the decoder's ``flops_per_token`` at equal tokens read. ``target_len`` should be
        the decoder length the loader pads to; unset, ``span_corruption.target_len`` if set, else the
        expected target length of the densest configured denoiser (T5's lengths: noise tokens, a
        sentinel per span and EOS) for a window of ``seq_len``."""
        if target_len is None:
            target_len = self.expected_target_len(seq_len)
        return self.flops_per_example(seq_len, target_len) / seq_len

    def expected_target_len(self, seq_len: int) -> int:
        """Decoder length for windows of ``seq_len`` tokens when the run does not say: the configured
        ``span_corruption.target_len``, else the longest expected target among the denoisers."""
        sc = self.cfg.span_corruption
        if sc is None:
            return seq_len
        if sc.target_len is not None:
            return sc.target_len
        lengths = []
        for d in sc.resolved():
            noise = max(1, round(d.noise_density * seq_len))
            spans = max(1, round(noise / d.mean_span_length)) if d.kind == "span" else 0
            lengths.append(noise + spans + 1)
        return max(lengths)
