"""Bidirectional encoders in plain PyTorch: a masked LM and ELECTRA, laid out as ModernBERT.

The encoder is ModernBERT's (Warner et al. 2024) module for module, under Hugging Face's names
(``embeddings.tok_embeddings``, ``layers.i.attn.Wqkv``, ``mlp.Wi``, ``final_norm``, ...), so the export
in ``model/hf_encoder.py`` is a rename of prefixes, never a permutation:

    token embedding -> LayerNorm -> blocks -> final LayerNorm
    block: x + Wo(attention(RoPE(Wqkv(attn_norm(x)))));  x + Wo(gelu(input) * gate), [input, gate] = Wi(mlp_norm(x))

LayerNorms without bias, no biases in the linear layers, GELU (erf, HF's ``"gelu"``) in the GLU and the
heads, RoPE in HF's ``rotate_half`` layout. Layer 0 has no attention norm because the embedding is
already normed. Every layer attends globally (ModernBERT alternates local windows; at tokenmill's
context lengths a window saves little and costs quality), so the export sets every HF layer global.

From ``ModelConfig`` the encoders use dim, n_layers, n_heads, ffn_hidden (the GLU width: Wi is
dim x 2·ffn_hidden), max_seq_len, rope_theta, norm_eps, init_std and the padded vocabulary. They ignore
n_kv_heads (ModernBERT has no grouped-query attention) and tie_embeddings (an MLM decoder always reuses
the token embedding, with a bias of its own, as BERT and ModernBERT do).

Like ``llama.py`` the models know nothing of parallelism: ``train/parallelize.py`` wraps, compiles and
shards each element of ``model.layers`` in place, which every model here exposes.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.eager_ops import apply_rope
from tokenmill.model.llama import ElectraConfig, ModelConfig, rope_angles
from tokenmill.tokens.corruption import MaskingConfig

# Output projections of the residual branches: their init is scaled down with depth (GPT-2), as in Llama.
RESIDUAL_OUTPUTS = ("attn.Wo.weight", "mlp.Wo.weight")


def _shape(cfg: ModelConfig, dim: int | None, n_heads: int | None, ffn_hidden: int | None) -> ModelConfig:
    """``cfg`` with the width overridden (ELECTRA's generator), checked as ModelConfig checks its own."""
    shape = cfg.model_copy(update={"dim": dim or cfg.dim, "n_heads": n_heads or cfg.n_heads,
                                   "ffn_hidden": ffn_hidden or cfg.ffn_hidden})
    if shape.dim % shape.n_heads or shape.head_dim % 2:
        raise ValueError(f"encoder dim={shape.dim} must split into n_heads={shape.n_heads} heads of even size")
    return shape


class Embeddings(nn.Module):
    """Token lookup, then LayerNorm. A generator sharing a wider discriminator's table reads it through
    ``proj`` (ELECTRA's ``embedding_size``): one table learns from both models' losses."""

    def __init__(self, cfg: ModelConfig, tok_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.tok_embeddings = tok_embeddings or nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        width = self.tok_embeddings.embedding_dim
        self.proj = nn.Linear(width, cfg.dim, bias=False) if width != cfg.dim else nn.Identity()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.tok_embeddings(input_ids)))


class Attention(nn.Module):
    """Multi-head self-attention over the whole window, both directions. One fused Wqkv whose output
    splits as [q | k | v], each [heads, head_dim], exactly as ModernBERT's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.Wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.Wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask, not causal: every token sees every token
        return self.Wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeGLU: one Wi gives [input | gate] (input first, as ModernBERT chunks it), Wo maps back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.dim, 2 * cfg.ffn_hidden, bias=False)
        self.Wo = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(input) * gate)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # The embedding is normed already; a second norm in layer 0 would only cost (ModernBERT).
        self.attn_norm = nn.Identity() if layer_idx == 0 else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PredictionHead(nn.Module):
    """ModernBERT's head before any output layer: dense, GELU, LayerNorm (no biases)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class Encoder(nn.Module):
    """Token ids [B, T] to hidden states [B, T, dim] (after the final norm), attending both ways.

    ``dim``, ``n_heads`` and ``ffn_hidden`` override ``cfg``'s (ELECTRA's smaller generator);
    ``tok_embeddings`` shares another encoder's table instead of making one (read through a projection
    when its width differs).
    """

    def __init__(self, cfg: ModelConfig, *, dim: int | None = None, n_heads: int | None = None,
                 ffn_hidden: int | None = None, tok_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.cfg = _shape(cfg, dim, n_heads, ffn_hidden)
        self.embeddings = Embeddings(self.cfg, tok_embeddings)
        self.layers = nn.ModuleList(Block(self.cfg, i) for i in range(self.cfg.n_layers))
        self.final_norm = nn.LayerNorm(self.cfg.dim, eps=self.cfg.norm_eps, bias=False)
        self.register_buffer("rope_cos", torch.empty(self.cfg.max_seq_len, self.cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(self.cfg.max_seq_len, self.cfg.head_dim), persistent=False)
        init_weights(self, self.cfg)

    @torch.no_grad()
    def init_rope(self) -> None:
        """RoPE tables in fp32, the same numbers as Llama's and HF ModernBERT's default RoPE."""
        angles = rope_angles(self.cfg).to(self.rope_cos.device)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_norm(x)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs of the scores and the weighted values: 12·L·dim·T. An encoder
        computes the whole T×T product, so here the count is exact, not a convention."""
        return 12 * self.cfg.n_layers * self.cfg.dim * seq_len


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Llama's init: Normal(0, init_std) matrices, residual output projections scaled by
    1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth, norms at one,
    biases at zero; then every encoder's RoPE tables. A shared table is initialised once. Separate from
    ``__init__`` so a model built on the meta device can be materialised later."""
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.ones_(p)
        elif name.endswith(RESIDUAL_OUTPUTS):
            nn.init.normal_(p, mean=0.0, std=residual_std)
        else:
            nn.init.normal_(p, mean=0.0, std=cfg.init_std)
    for module in model.modules():
        if isinstance(module, Encoder):
            module.init_rope()


def _masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy in fp32, labels of -1 ignored, as Llama.forward computes it."""
    loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-1, reduction=reduction)
    return loss.view_as(labels) if reduction == "none" else loss


class MaskedLM(nn.Module):
    """Encoder + ModernBERT's MLM head: prediction head, then a decoder tied to the token embedding,
    with a bias. ``dim``/``n_heads``/``ffn_hidden``/``tok_embeddings`` as for ``Encoder``; with a
    shared table wider than ``dim`` the head projects back to its width (``out_proj``) before the tied
    decoder, as ELECTRA's generator does."""

    def __init__(self, cfg: ModelConfig, *, dim: int | None = None, n_heads: int | None = None,
                 ffn_hidden: int | None = None, tok_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, dim=dim, n_heads=n_heads, ffn_hidden=ffn_hidden, tok_embeddings=tok_embeddings)
        table = self.encoder.embeddings.tok_embeddings
        width = self.encoder.cfg.dim
        self.head = PredictionHead(width, cfg.norm_eps)
        wider = table.embedding_dim != width
        self.out_proj = nn.Linear(width, table.embedding_dim, bias=False) if wider else nn.Identity()
        self.decoder = nn.Linear(table.embedding_dim, table.num_embeddings, bias=True)
        self.decoder.weight = table.weight
        self.init_weights()

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's blocks, for train/parallelize.py (a view: not registered twice)."""
        return self.encoder.layers

    def init_weights(self) -> None:
        init_weights(self, self.encoder.cfg)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for encoder outputs ``hidden`` [..., dim] (any leading shape, so a caller
        may pass only the masked positions)."""
        return self.decoder(self.out_proj(self.head(hidden)))

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, padded_vocab] and, with ``labels`` [B, T] (-1 where nothing is predicted), the
        fp32 cross-entropy: the mean over predicted tokens, or with ``reduction="none"`` per token
        [B, T] (0 where ignored), for per-domain losses. Without labels the loss is None."""
        logits = self.predict(self.encoder(input_ids))
        if labels is None:
            return logits, None
        return logits, _masked_lm_loss(logits, labels, reduction)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count. The token table is also the decoder's matrix (a matmul, not only a lookup),
        so ``exclude_embedding`` keeps it, as Llama does for tied embeddings; the flag is there so
        callers can treat every model alike."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6·N (N counts the tied table once, as the
        decoder) plus attention, Llama's convention. The decoder runs at every position."""
        return 6 * self.num_params(exclude_embedding=True) + self.encoder.attention_flops_per_token(seq_len)


class _Layers:
    """Several encoders' blocks as one list that ``train/parallelize.py`` can iterate and assign into
    (``model.layers[i] = checkpoint_wrapper(...)`` lands in the owning encoder's ModuleList)."""

    def __init__(self, *lists: nn.ModuleList):
        self._lists = lists

    def _locate(self, i: int) -> tuple[nn.ModuleList, int]:
        i = i + len(self) if i < 0 else i
        for layers in self._lists:
            if i < len(layers):
                return layers, i
            i -= len(layers)
        raise IndexError("layer index out of range")

    def __len__(self) -> int:
        return sum(len(layers) for layers in self._lists)

    def __iter__(self) -> Iterator[nn.Module]:
        for layers in self._lists:
            yield from layers

    def __getitem__(self, i: int) -> nn.Module:
        layers, j = self._locate(i)
        return layers[j]

    def __setitem__(self, i: int, module: nn.Module) -> None:
        layers, j = self._locate(i)
        layers[j] = module


def generator_shape(cfg: ModelConfig, size: float) -> tuple[int, int, int]:
    """(dim, n_heads, ffn_hidden) of ELECTRA's generator at ``size`` of the width: heads scaled and
    at least one, dim the nearest multiple of 2·heads to size·dim (so head_dim stays even), the GLU
    width scaled with dim."""
    n_heads = max(1, round(cfg.n_heads * size))
    dim = max(2 * n_heads, 2 * n_heads * round(cfg.dim * size / (2 * n_heads)))
    ffn_hidden = max(1, round(cfg.ffn_hidden * dim / cfg.dim))
    return dim, n_heads, ffn_hidden


class Electra(nn.Module):
    """ELECTRA (Clark et al. 2020): a small MLM generator fills the masked positions with samples from
    its softmax; the discriminator, the model kept, tells which tokens were replaced.

    The discriminator is an ``Encoder`` plus a replaced-token-detection head laid out as ModernBERT's
    token-classification head (``rtd_head``: dense, GELU, LayerNorm; ``rtd_classifier``: Linear(dim, 1)
    with bias), so it exports as ``ModernBertForTokenClassification``. The generator is a ``MaskedLM``
    at ``cfg.electra.generator_size`` of the width, same depth, reading the discriminator's token table
    (the paper shares embeddings: the generator's MLM loss trains the table the discriminator reads).

    ``pad_id``: positions whose original token is ``pad_id`` are left out of the replaced-token loss
    and accuracy (packed windows have none; None counts every position).
    """

    def __init__(self, cfg: ModelConfig, *, pad_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.electra = cfg.electra or ElectraConfig()
        self.mask_rate = (cfg.masking or MaskingConfig()).mask_rate
        self.pad_id = pad_id
        self.discriminator = Encoder(cfg)
        self.rtd_head = PredictionHead(cfg.dim, cfg.norm_eps)
        self.rtd_classifier = nn.Linear(cfg.dim, 1, bias=True)
        dim, n_heads, ffn_hidden = generator_shape(cfg, self.electra.generator_size)
        self.generator = MaskedLM(cfg, dim=dim, n_heads=n_heads, ffn_hidden=ffn_hidden,
                                  tok_embeddings=self.discriminator.embeddings.tok_embeddings)
        self.init_weights()

    @property
    def layers(self) -> _Layers:
        """The generator's blocks, then the discriminator's, for train/parallelize.py."""
        return _Layers(self.generator.encoder.layers, self.discriminator.layers)

    def init_weights(self) -> None:
        init_weights(self, self.cfg)

    def rtd_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replaced-token logits [B, T] (positive: replaced) of the discriminator."""
        return self.rtd_classifier(self.rtd_head(self.discriminator(input_ids))).squeeze(-1)

    @torch.no_grad()
    def _sample(self, logits: torch.Tensor, sample_seed: torch.Generator | None) -> torch.Tensor:
        """One token per row of ``logits`` from the generator's softmax (no gradient flows through
        sampling, as in the paper); the padding rows of the vocabulary are never drawn."""
        logits = logits[:, : self.cfg.vocab_size].float()
        if logits.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=logits.device)
        if sample_seed is not None and sample_seed.device.type != logits.device.type:
            raise ValueError(f"sample_seed is a torch.Generator on {sample_seed.device} but the model runs on "
                             f"{logits.device}: create it with torch.Generator(device={logits.device.type!r})")
        return torch.multinomial(logits.softmax(-1), 1, generator=sample_seed).squeeze(-1)

    def forward(self, input_ids_masked: torch.Tensor, labels: torch.Tensor, *,
                sample_seed: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses for masked inputs [B, T] whose ``labels`` [B, T] hold the original token where a position
        was chosen for masking and -1 elsewhere.

        The generator's MLM head runs only at the chosen positions (as ELECTRA's reference and
        ModernBERT's sparse prediction do). Returns ``loss`` = mlm + discriminator_weight · rtd,
        ``mlm_loss`` (fp32 cross-entropy over chosen positions), ``rtd_loss`` (BCE with logits over
        non-pad positions, target: the discriminator's input differs from the original), ``rtd_accuracy``
        and ``per_sequence`` [B], each sequence's combined loss. Every loss is the mean of the per-sequence
        ones (each sequence's mean over its own positions), so ``loss == per_sequence.mean()`` exactly,
        whichever of the two a trainer optimises.
        """
        masked = labels >= 0
        hidden = self.generator.encoder(input_ids_masked)
        gen_logits = self.generator.predict(hidden[masked])  # [M, vocab]
        token_mlm = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        token_mlm[masked] = F.cross_entropy(gen_logits.float(), labels[masked], reduction="none")
        mlm = token_mlm.sum(1) / masked.sum(1).clamp(min=1)

        replaced_input = input_ids_masked.clone()
        replaced_input[masked] = self._sample(gen_logits.detach(), sample_seed)
        original = torch.where(masked, labels, input_ids_masked)
        targets = (replaced_input != original).float()
        real = (original != self.pad_id) if self.pad_id is not None else torch.ones_like(masked)
        logits = self.rtd_logits(replaced_input).float()
        token_rtd = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * real
        rtd = token_rtd.sum(1) / real.sum(1).clamp(min=1)

        per_sequence = mlm + self.electra.discriminator_weight * rtd
        with torch.no_grad():
            accuracy = (((logits > 0).float() == targets) & real).sum() / real.sum().clamp(min=1)
        return dict(loss=per_sequence.mean(), mlm_loss=mlm.mean(), rtd_loss=rtd.mean(), rtd_accuracy=accuracy,
                    per_sequence=per_sequence)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Generator + discriminator, the shared token table once (it is also the generator decoder's
        matrix, so ``exclude_embedding`` keeps it, as for ``MaskedLM``)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward, Llama's convention (6·N + attention) for each
        part: the discriminator's blocks and RTD head at every position (its table is a lookup), the
        generator's blocks and input projection at every position, and the generator's MLM head, output
        projection and tied decoder at the chosen positions only (mask_rate of them, expected)."""
        gen = self.generator
        disc_n = (sum(p.numel() for p in self.discriminator.parameters())
                  - self.discriminator.embeddings.tok_embeddings.weight.numel()
                  + sum(p.numel() for p in (*self.rtd_head.parameters(), *self.rtd_classifier.parameters())))
        gen_body_n = sum(p.numel() for n, p in gen.encoder.named_parameters() if not n.startswith("embeddings.tok_"))
        gen_head_n = sum(p.numel() for m in (gen.head, gen.out_proj, gen.decoder) for p in m.parameters())
        attention = sum(e.attention_flops_per_token(seq_len) for e in (self.discriminator, gen.encoder))
        return 6 * (disc_n + gen_body_n + self.mask_rate * gen_head_n) + attention
