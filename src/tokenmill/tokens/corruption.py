"""Masking and span corruption at load time: the settings of the non-causal objectives.

The token shards stay the decoder's; an encoder's masked inputs and an encoder-decoder's corrupted
inputs and targets are made from each training window as it is loaded, deterministically from the
run's seed and the window's global sequence index, so a resumed run (on any world size) sees the same
batches.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill import TokenmillError


class MaskingConfig(BaseModel):
    """BERT-style masking (Devlin et al. 2019): ``mask_rate`` of the tokens are chosen; of those,
    ``mask_fraction`` become the mask token, ``random_fraction`` a random token, the rest stay."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mask_rate: float = Field(0.15, gt=0, lt=1, description="Share of tokens chosen for prediction (RoBERTa and "
                             "ELECTRA 0.15; ModernBERT 0.3).")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="Chosen tokens replaced by the mask token.")
    random_fraction: float = Field(0.1, ge=0, le=1, description="Chosen tokens replaced by a random token; the "
                                   "rest of the chosen tokens stay as they are.")

    @model_validator(mode="after")
    def _fractions(self) -> "MaskingConfig":
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"mask_fraction + random_fraction = {self.mask_fraction + self.random_fraction} > 1")
        return self


class Denoiser(BaseModel):
    """One denoising task: T5 span corruption (``span``) or prefix language modelling (``prefix``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["span", "prefix"] = Field("span", description="span: noise spans replaced by sentinels, the "
                                            "target lists them; prefix: the target is the window's continuation.")
    mean_span_length: float = Field(3.0, ge=1, description="span only: mean noise span length in tokens (mu).")
    noise_density: float = Field(0.15, gt=0, lt=1, description="span: share of tokens in noise spans (r); "
                                 "prefix: share of the window that is the target.")
    rate: float = Field(1.0, gt=0, description="Relative frequency of this denoiser among the configured ones.")
    mode_token: str | None = Field(None, description="UL2 paradigm token put first in the encoder input "
                                   "(e.g. [NLU], [NLG], [S2S]); added to the tokenizer.")


UL2_DENOISERS = [  # Tay et al. 2023, Table/section 3.1.2: R, X and S denoisers with their paradigm tokens
    Denoiser(kind="span", mean_span_length=3, noise_density=0.15, rate=1, mode_token="[NLU]"),
    Denoiser(kind="span", mean_span_length=8, noise_density=0.15, rate=1, mode_token="[NLU]"),
    Denoiser(kind="span", mean_span_length=3, noise_density=0.5, rate=1, mode_token="[NLG]"),
    Denoiser(kind="span", mean_span_length=8, noise_density=0.5, rate=1, mode_token="[NLG]"),
    Denoiser(kind="span", mean_span_length=64, noise_density=0.15, rate=1, mode_token="[NLG]"),
    Denoiser(kind="span", mean_span_length=64, noise_density=0.5, rate=1, mode_token="[NLG]"),
    Denoiser(kind="prefix", noise_density=0.25, rate=2, mode_token="[S2S]"),
]


class SpanCorruptionConfig(BaseModel):
    """T5 span corruption (Raffel et al. 2020) by default; ``preset: ul2`` is UL2's mixture of denoisers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: Literal["t5", "ul2"] | None = Field("t5", description="t5: one denoiser, mu 3, r 0.15. ul2: R, X and "
                                                "S denoisers with paradigm tokens. null: `denoisers` as given.")
    denoisers: list[Denoiser] = Field(default_factory=list, description="The denoisers when preset is null.")
    sentinels: int = Field(100, ge=1, description="Sentinel tokens <extra_id_0>.. added to the tokenizer (T5: 100).")
    target_len: int | None = Field(None, gt=0, description="Decoder length; default from the densest denoiser.")

    @model_validator(mode="after")
    def _one_source(self) -> "SpanCorruptionConfig":
        if self.preset is not None and self.denoisers:
            raise ValueError("set preset or denoisers, not both (preset: null to list your own)")
        if self.preset is None and not self.denoisers:
            raise ValueError("preset: null needs at least one denoiser")
        return self

    def resolved(self) -> list[Denoiser]:
        """The denoisers this setting trains with."""
        if self.preset == "t5":
            return [Denoiser()]
        if self.preset == "ul2":
            return [d.model_copy() for d in UL2_DENOISERS]
        return self.denoisers


# ---- special tokens ----------------------------------------------------------------------------------

SPECIAL = {"mask": "<mask>", "cls": "<cls>", "sep": "<sep>", "pad": "<pad>"}
_MASK_STREAM, _SPAN_STREAM = 5, 6  # seed streams of masking and span corruption (the loader's are 1 and 3)


def sentinel(i: int) -> str:
    """The ``i``-th sentinel token, named as T5's."""
    return f"<extra_id_{i}>"


def required_tokens(objective: str, span: SpanCorruptionConfig | None) -> list[str]:
    """The special tokens ``objective`` needs beside EOS, in the order the tokenizer adds them: mlm and
    electra the mask, cls, sep and pad tokens; span_corruption pad, the sentinels and the denoisers'
    mode tokens; clm none."""
    if objective == "clm":
        return []
    if objective in ("mlm", "electra"):
        return [SPECIAL[k] for k in ("mask", "cls", "sep", "pad")]
    if objective == "span_corruption":
        span = span or SpanCorruptionConfig()
        modes = [d.mode_token for d in span.resolved() if d.mode_token]
        return list(dict.fromkeys([SPECIAL["pad"], *(sentinel(i) for i in range(span.sentinels)), *modes]))
    raise TokenmillError(f"model.objective {objective!r} is not one of clm, mlm, electra, span_corruption")


# ---- masking -----------------------------------------------------------------------------------------


def _uniforms(seed: int, stream: int, g: np.ndarray, n: int) -> np.ndarray:
    """[B, n] uniforms in [0, 1), row i a pure function of (seed, stream, g[i]): the same sequence gets the
    same draws whatever batch, rank or world size it is loaded in. ``Generator.random`` draws in order, so
    the first k of n draws are the k draws a shorter call would make."""
    if seed < 0:
        raise TokenmillError(f"corruption: the seed must be >= 0, got {seed}")
    g = np.asarray(g, np.int64).reshape(-1)
    out = np.empty((len(g), n))
    for i, gi in enumerate(g.tolist()):
        out[i] = np.random.default_rng([seed, stream, gi]).random(n)
    return out


def mask_tokens(
    tokens: np.ndarray, g: np.ndarray, cfg: MaskingConfig, *, seed: int, mask_id: int, vocab_size: int,
    special_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of ``tokens`` [B, T]: ``(inputs, labels)``, both int64 [B, T]; labels hold the original
    token at the chosen positions and -1 elsewhere.

    Exact counts, not a Bernoulli draw per token (as Hugging Face's DataCollatorForLanguageModeling does):
    each row chooses k = ``mask_rate`` · n_eligible positions, stochastically rounded (so the mean is exact
    and the count varies by less than one), uniformly among its eligible tokens; ``mask_id``, every id in
    ``special_ids`` (EOS, pad, cls, sep, ...) and ids outside [0, vocab_size) are never chosen. Of the k, a
    uniform subset of ``mask_fraction`` · k (stochastically rounded) becomes ``mask_id``, a further
    ``random_fraction`` · k a token drawn uniformly from the non-special ids, the rest stay. Row i depends
    only on (seed, g[i]) and its tokens.
    """
    tokens = np.asarray(tokens, np.int64)
    if tokens.ndim != 2 or len(np.asarray(g).reshape(-1)) != len(tokens):
        raise TokenmillError(f"mask_tokens: need tokens [B, T] and g [B]; got {tokens.shape} and {np.shape(g)}")
    b, t = tokens.shape
    special = np.union1d(np.asarray(special_ids, np.int64).reshape(-1), [mask_id])
    special = special[(special >= 0) & (special < vocab_size)]
    allowed = vocab_size - len(special)
    if allowed < 1:
        raise TokenmillError(f"mask_tokens: every one of the {vocab_size} ids is special; nothing to mask with")
    eligible = ~np.isin(tokens, special) & (tokens >= 0) & (tokens < vocab_size)
    u = _uniforms(seed, _MASK_STREAM, g, 2 * t + 2)
    keys = np.where(eligible, u[:, :t], np.inf)  # the k smallest keys of a row are its chosen positions
    rank = np.empty((b, t), np.int64)
    np.put_along_axis(rank, np.argsort(keys, axis=1, kind="stable"), np.arange(t)[None].repeat(b, 0), axis=1)
    k = np.minimum(np.floor(cfg.mask_rate * eligible.sum(1) + u[:, 2 * t]), eligible.sum(1)).astype(np.int64)
    # Ranks below k are the chosen positions in a uniformly random order, so rank cut-offs split them.
    n_mask = np.floor(cfg.mask_fraction * k + u[:, 2 * t + 1]).astype(np.int64)
    n_swap = np.minimum(np.floor((cfg.mask_fraction + cfg.random_fraction) * k + u[:, 2 * t + 1]), k).astype(np.int64)
    chosen = rank < k[:, None]
    to_mask = rank < n_mask[:, None]
    to_random = ~to_mask & (rank < n_swap[:, None])
    # The r-th non-special id: r plus the number of special ids at or below it.
    r = np.minimum((u[:, t:2 * t] * allowed).astype(np.int64), allowed - 1)
    random_ids = r + np.searchsorted(special - np.arange(len(special)), r, side="right")
    inputs = np.where(to_mask, mask_id, np.where(to_random, random_ids, tokens))
    labels = np.where(chosen, tokens, -1)
    return inputs, labels


# ---- span corruption ---------------------------------------------------------------------------------


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a ``length``-token window, as T5's ``random_spans_noise_mask``: at
    least one noise and one kept token, at least one span, and no more spans than either has tokens."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_span_length), 1), noise, length - noise)
    return noise, spans


def _lengths(d: Denoiser, length: int) -> tuple[int, int]:
    """(input, target) lengths, EOS and mode token included, that denoiser ``d`` makes of ``length`` tokens."""
    mode = 1 if d.mode_token else 0
    if d.kind == "prefix":
        target = min(max(round(length * d.noise_density), 1), length - 1)
        return length - target + 1 + mode, target + 1
    noise, spans = _span_counts(length, d.noise_density, d.mean_span_length)
    return length - noise + spans + 1 + mode, noise + spans + 1


def raw_length(input_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """T5's ``compute_input_and_target_lengths``: the longest raw window whose span-corrupted input, with
    its EOS, is at most ``input_len`` tokens, and the target length (EOS included) it then has; like T5,
    at noise density 0.5 the window is one token shorter where that keeps the target within the input.
    (T5: input 512, density 0.15, mean span 3 -> raw 568, target 114.)"""
    if input_len < 3:
        raise TokenmillError(f"span corruption: an input of {input_len} tokens cannot hold a kept token, a "
                             "sentinel and EOS; use a sequence length of at least 3")
    d = Denoiser(kind="span", noise_density=noise_density, mean_span_length=mean_span_length)
    length = 2
    while _lengths(d, length + 1)[0] <= input_len:
        length += 1
    target = _lengths(d, length)[1]
    if noise_density == 0.5 and target > input_len:
        length, target = length - 1, _lengths(d, length - 1)[1]
    return length, target


def _natural_length(d: Denoiser, input_len: int) -> tuple[int, int]:
    """(raw window, target length) denoiser ``d`` makes of an encoder input of ``input_len`` tokens."""
    mode = 1 if d.mode_token else 0
    if d.kind == "span":
        return raw_length(input_len - mode, d.noise_density, d.mean_span_length)
    length = 2
    while _lengths(d, length + 1)[0] <= input_len:
        length += 1
    return length, _lengths(d, length)[1]


def _fitted_length(d: Denoiser, input_len: int, target_len: int) -> int:
    """The longest raw window whose input and target both fit (0 if not even 2 tokens do). Both lengths
    grow with the window, so every shorter window fits too."""
    return _fitted(d.kind, d.noise_density, d.mean_span_length, d.mode_token is not None, input_len, target_len)


@lru_cache(maxsize=256)
def _fitted(kind: str, density: float, mu: float, mode: bool, input_len: int, target_len: int) -> int:
    d = Denoiser(kind=kind, noise_density=density, mean_span_length=mu, mode_token="m" if mode else None)
    fits = lambda length: all(a <= b for a, b in zip(_lengths(d, length), (input_len, target_len)))  # noqa: E731
    if not fits(2):
        return 0
    length = 2
    while fits(length + 1):
        length += 1
    return length


class CorruptionShapes(NamedTuple):
    """Window and sequence lengths of an objective: ``raw_len`` tokens are cut from the stream per
    sequence; the encoder (or decoder, for clm) reads ``input_len``; span corruption's decoder reads
    ``target_len``. ``denoiser_raw``: the tokens of the raw window each denoiser uses (a prefix of it)."""

    raw_len: int
    input_len: int
    target_len: int
    denoiser_raw: tuple[int, ...] = ()


def corruption_shapes(objective: str, model: Any, seq_len: int) -> CorruptionShapes:
    """The lengths an objective trains with at ``train.seq_len``: clm cuts seq_len + 1 tokens (inputs and
    next-token targets), mlm and electra seq_len; span corruption's encoder input is seq_len tokens, its
    target length ``span_corruption.target_len`` or, unset, the longest any denoiser needs, and its raw
    window the longest any denoiser can use within both. Nothing is then ever truncated: each denoiser
    uses the prefix of the window that fits. ``model`` is a ``ModelConfig`` (read: max_seq_len,
    span_corruption). Refuses a denoiser whose spans or prefix cannot fit the sequence, and targets
    longer than the model's positions."""
    if objective == "clm":
        return CorruptionShapes(seq_len + 1, seq_len, seq_len)
    if objective in ("mlm", "electra"):
        return CorruptionShapes(seq_len, seq_len, seq_len)
    if objective != "span_corruption":
        required_tokens(objective, None)  # raises the unknown-objective error
    cfg: SpanCorruptionConfig = getattr(model, "span_corruption", None) or SpanCorruptionConfig()
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and seq_len > max_len:
        raise TokenmillError(f"train.seq_len={seq_len} is longer than model.max_seq_len={max_len}: the encoder "
                             "reads seq_len tokens; lower seq_len or raise max_seq_len")
    denoisers = cfg.resolved()
    names = [_denoiser_name(cfg, i, d) for i, d in enumerate(denoisers)]
    for name, d in zip(names, denoisers):
        if seq_len < 3 + (1 if d.mode_token else 0):
            raise TokenmillError(f"{name}: train.seq_len={seq_len} cannot hold a kept token, a sentinel (or the "
                                 "target's first token), EOS and the mode token; raise train.seq_len")
    target_len = cfg.target_len or max(_natural_length(d, seq_len)[1] for d in denoisers)
    if max_len is not None and target_len > max_len:
        raise TokenmillError(f"model.span_corruption: the decoder's targets of {target_len} tokens are longer than "
                             f"model.max_seq_len={max_len}; set model.span_corruption.target_len <= {max_len} or "
                             "raise max_seq_len")
    lengths = []
    for name, d in zip(names, denoisers):
        length = _fitted_length(d, seq_len, target_len)
        if length < 2:
            raise TokenmillError(f"{name}: a target of model.span_corruption.target_len={target_len} tokens cannot "
                                 "hold one target token and EOS; raise target_len or leave it unset")
        if d.kind == "span" and round(_span_counts(length, d.noise_density, d.mean_span_length)[0]
                                      / d.mean_span_length) == 0:
            noise = _span_counts(length, d.noise_density, d.mean_span_length)[0]
            raise TokenmillError(
                f"{name}: the spans do not fit: a {seq_len}-token input (target {target_len}) holds {noise} noise "
                f"tokens, under half a span of {d.mean_span_length:g}; raise train.seq_len (or target_len) or "
                "shorten the spans")
        lengths.append(length)
    return CorruptionShapes(max(lengths), seq_len, target_len, tuple(lengths))


def _denoiser_name(cfg: SpanCorruptionConfig, i: int, d: Denoiser) -> str:
    where = f"model.span_corruption.denoisers.{i}" if cfg.preset is None else \
        f"model.span_corruption (preset {cfg.preset}, denoiser {i})"
    if d.kind == "prefix":
        return f"{where}, prefix noise_density={d.noise_density:g}"
    return f"{where}, span mean_span_length={d.mean_span_length:g} noise_density={d.noise_density:g}"


def span_corrupt(
    tokens: np.ndarray, g: np.ndarray, cfg: SpanCorruptionConfig, *, seed: int, sentinel_ids: list[int],
    mode_ids: dict[str, int], pad_id: int, eos_id: int, input_len: int, target_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt raw windows ``tokens`` [B, W] into ``(enc_inputs [B, input_len], targets [B, target_len])``,
    int64, inputs padded with ``pad_id`` and targets with -1.

    Each row picks a denoiser in proportion to ``rate`` and uses the longest prefix of its window whose
    input and target fit (``corruption_shapes`` sizes W for the longest; a shorter W makes every row use
    at most W tokens). Nothing is truncated. A span denoiser follows T5's ``random_spans_noise_mask``:
    round(L·density) noise tokens in round(noise/mean_span_length) spans, the noise and the kept tokens
    each cut into that many segments at uniformly random points, alternating from a kept one; the input
    is the kept tokens with each noise span replaced by the next sentinel, the target each span's
    sentinel then its tokens. A prefix denoiser's input is the window's first (1 - density), its target
    the rest. The mode token (UL2) comes first in the input; input and target end with ``eos_id``.
    A row with more spans than sentinels reuses them from the first (sentinel i mod n): spans are
    matched by order, so the target stays decodable. Row i depends only on (seed, g[i]) and its tokens.
    """
    tokens = np.asarray(tokens, np.int64)
    g = np.asarray(g, np.int64).reshape(-1)
    if tokens.ndim != 2 or len(g) != len(tokens):
        raise TokenmillError(f"span_corrupt: need tokens [B, W] and g [B]; got {tokens.shape} and {g.shape}")
    if not sentinel_ids:
        raise TokenmillError("span_corrupt: no sentinel ids given")
    b, w = tokens.shape
    denoisers = cfg.resolved()
    missing = sorted({d.mode_token for d in denoisers if d.mode_token and d.mode_token not in mode_ids})
    if missing:
        raise TokenmillError(f"span_corrupt: no token id given for mode token(s) {missing}")
    u = _uniforms(seed, _SPAN_STREAM, g, w + 1)
    rates = np.cumsum([d.rate for d in denoisers])
    which = np.minimum(np.searchsorted(rates, u[:, 0] * rates[-1], side="right"), len(denoisers) - 1)
    sentinels = np.asarray(sentinel_ids, np.int64)
    inputs = np.full((b, input_len), pad_id, np.int64)
    targets = np.full((b, target_len), -1, np.int64)
    for j in np.unique(which).tolist():
        d, rows = denoisers[j], np.flatnonzero(which == j)
        length = min(w, _fitted_length(d, input_len, target_len))
        if length < 2:
            raise TokenmillError(f"span_corrupt: denoiser {j} fits no window in input_len={input_len}, "
                                 f"target_len={target_len} (raw window {w}); size them with corruption_shapes")
        window, keys = tokens[rows, :length], u[rows, 1:]
        if d.kind == "prefix":
            cut = length - (_lengths(d, length)[1] - 1)
            body_in, body_out = window[:, :cut], window[:, cut:]
        else:
            body_in, body_out = _span_bodies(window, keys, d, sentinels)
        head = [np.full((len(rows), 1), mode_ids[d.mode_token])] if d.mode_token else []
        eos = np.full((len(rows), 1), eos_id)
        enc = np.concatenate([*head, body_in, eos], axis=1)
        dec = np.concatenate([body_out, eos], axis=1)
        if enc.shape[1] > input_len or dec.shape[1] > target_len:  # _fitted_length rules this out
            raise AssertionError(f"span_corrupt: {enc.shape[1]}/{dec.shape[1]} > {input_len}/{target_len}")
        inputs[rows, :enc.shape[1]] = enc
        targets[rows, :dec.shape[1]] = dec
    return inputs, targets


def _segments(keys: np.ndarray, items: int, parts: int) -> np.ndarray:
    """Lengths [n, parts] of ``items`` tokens cut into ``parts`` non-empty segments at uniformly random
    points: the parts - 1 cuts are the boundaries with the smallest keys (T5's ``_random_segmentation``)."""
    n = len(keys)
    if parts == 1:
        return np.full((n, 1), items, np.int64)
    cuts = np.sort(np.argpartition(keys[:, :items - 1], parts - 2, axis=1)[:, :parts - 1], axis=1) + 1
    bounds = np.concatenate([np.zeros((n, 1), np.int64), cuts, np.full((n, 1), items, np.int64)], axis=1)
    return np.diff(bounds, axis=1)


def _span_bodies(window: np.ndarray, keys: np.ndarray, d: Denoiser, sentinels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of equal-length rows: (kept tokens with a sentinel per span, each span's sentinel
    then its tokens), EOS and mode token not included."""
    n, length = window.shape
    noise, spans = _span_counts(length, d.noise_density, d.mean_span_length)
    noise_lengths = _segments(keys[:, :noise - 1], noise, spans)
    kept_lengths = _segments(keys[:, noise - 1:length - 2], length - noise, spans)
    ends = np.cumsum(np.stack([kept_lengths, noise_lengths], axis=2).reshape(n, 2 * spans), axis=1)
    starts, stops = ends[:, 0::2], ends[:, 1::2]  # each noise span's first position and end
    rows = np.arange(n)[:, None]
    edge = np.zeros((n, length + 1), np.int64)
    np.add.at(edge, (rows, starts), 1)
    np.add.at(edge, (rows, stops), -1)
    is_noise = np.cumsum(edge, axis=1)[:, :length] > 0
    first = np.zeros((n, length), bool)
    first[rows, starts] = True
    marker = sentinels[(np.cumsum(first, axis=1) - 1) % len(sentinels)]
    # Two slots per position, a sentinel before it and the token itself; each side keeps its own.
    both = np.stack([marker, window], axis=2).reshape(n, 2 * length)
    keep_in = np.stack([first, ~is_noise], axis=2).reshape(n, 2 * length)
    keep_out = np.stack([first, is_noise], axis=2).reshape(n, 2 * length)
    return both[keep_in].reshape(n, -1), both[keep_out].reshape(n, -1)
