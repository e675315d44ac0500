"""What a training run needs besides the model's shape: batch, schedule, optimizer, precision, cadence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill import TokenmillError

# A moving average's decay: at 1 or more it never forgets (or grows), and AdamW refuses it only once
# training starts.
Beta = Annotated[float, Field(ge=0, lt=1)]


class WandbConfig(BaseModel):
    """Weights & Biases logging; offline by default, so a run never needs the network."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(description="W&B project the run is filed under.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="'offline' writes under train/wandb/ (sync later with `wandb sync`); 'online' uploads."
    )


class AdamWConfig(BaseModel):
    """AdamW on every parameter (the default); its lr, betas, eps and weight_decay are train's own."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["adamw"] = "adamw"


class MuonConfig(BaseModel):
    """Muon (Jordan et al. 2024) on the blocks' 2-D weight matrices, AdamW (train's lr, betas, eps) on
    embeddings, the output head and norms. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["muon"] = "muon"
    momentum: Beta = Field(0.95, description="Muon momentum, in [0, 1).")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    ns_steps: int = Field(5, ge=1, lt=100, description="Newton–Schulz iterations that orthogonalise each "
                          "update (torch refuses 100 or more).")
    adjust_lr_fn: Literal["match_rms_adamw", "original"] = Field(
        "match_rms_adamw",
        description="'match_rms_adamw' scales each update to AdamW's RMS (0.2·sqrt(max(m, n))), so train.lr "
        "carries over from AdamW; 'original' is Keller Jordan's sqrt(max(1, m/n)), which wants an lr near 0.02.",
    )


class GaLoreConfig(BaseModel):
    """GaLore (Zhao et al. 2024): Adam moments of the blocks' 2-D weights live in a rank-``rank``
    projection of their gradients, refreshed by SVD every ``update_proj_gap`` steps; other parameters
    get plain AdamW. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["galore"] = "galore"
    rank: int = Field(128, gt=0, description="Rank of the gradient projection (capped at min(m, n) per matrix).")
    update_proj_gap: int = Field(200, ge=1, description="Steps between SVD refreshes of each projection.")
    scale: float = Field(0.25, gt=0, description="Factor on the projected-back update (the paper's alpha).")
    proj_type: Literal["std", "left", "right"] = Field(
        "std",
        description="Which side of each m×n gradient G to project: 'std' the shorter one (moments "
        "max(m, n)×rank, projector min(m, n)×rank), 'left' always rows (U_rᵀ·G), 'right' always columns (G·V_r).",
    )
    per_layer_update: bool = Field(
        False, description="The paper's per-layer weight updates: each parameter steps as soon as backward has "
        "its gradient, which is then freed, so the model's gradients never exist at once. Needs one micro-batch "
        "per step (no accumulation), grad_clip 0 (no global norm to clip by) and one process.")


class SLTrainConfig(BaseModel):
    """SLTrain (Han et al. 2024): each block weight becomes a low-rank product plus a fixed-support
    sparse matrix; the optimizer is AdamW over whatever the model then trains. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["sltrain"] = "sltrain"
    rank: int = Field(128, gt=0, description="Rank of the low-rank factor B·A.")
    density: float = Field(0.03, gt=0, le=1, description="Fraction of each weight's entries in the sparse part.")
    alpha: float = Field(32, gt=0, description="The low-rank product is scaled by alpha / rank.")


OptimizerConfig = Annotated[
    AdamWConfig | MuonConfig | GaLoreConfig | SLTrainConfig, Field(discriminator="name")
]


class MixturePhase(BaseModel):
    """One stretch of training with fixed domain weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    until: float = Field(gt=0, le=1, description="Where the phase ends, as a fraction of max_steps (the last "
                         "phase ends at 1.0); phases change at the optimizer step nearest to it.")
    weights: dict[str, float] | None = Field(
        None, description="Sampling weight per domain (absent = 0); null = natural proportions.")
    upsample: dict[str, float] | None = Field(
        None, description="Multipliers on the natural proportions (absent = ×1), e.g. {code: 4} for "
        "end-of-training upsampling; exclusive with weights.")

    @model_validator(mode="after")
    def _one_kind(self) -> "MixturePhase":
        if self.weights is not None and self.upsample is not None:
            raise ValueError("set weights or upsample, not both")
        for what, values in (("weights", self.weights), ("upsample", self.upsample)):
            if values is not None and (any(v < 0 for v in values.values()) or
                                       (what == "weights" and not any(v > 0 for v in values.values()))):
                raise ValueError(f"{what} must be >= 0{' and not all 0' if what == 'weights' else ''}; got {values}")
        return self


class DoReMiConfig(BaseModel):
    """DoReMi (Xie et al. 2023): group DRO over domains. After every step, each domain's excess loss over
    the reference run's, clipped at 0, raises its weight by exponentiated gradient; the weights are then
    smoothed toward uniform. Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reference: str = Field(description="A finished run folder (or its train/ folder) of the same tokens whose "
                           "final per-domain validation loss is the reference loss.")
    step_size: float = Field(1.0, gt=0, description="Exponentiated-gradient step size (the paper's eta).")
    smoothing: float = Field(1e-3, ge=0, le=1, description="Mix of uniform weights after each update (c).")


class MixtureConfig(BaseModel):
    """How much of each domain training sees, and when: phases over the token budget, and losses
    reweighted online by domain (DoReMi) or by sequence. Mixing happens in the loader, so no schedule
    needs new tokens."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    phases: list[MixturePhase] = Field(
        default_factory=lambda: [MixturePhase(until=1.0)], min_length=1,
        description="Phases in order; each ends at its `until` and the last at 1.0. Default: one phase of "
        "natural proportions.")
    online: Literal["none", "doremi"] = Field(
        "none", description="'doremi' weights each domain's loss by DoReMi's weights, updated every step from its "
        "excess loss; the data keep the phase's proportions (one phase); summary.json's doremi_mean_weights is "
        "the mixture for the final run.")
    doremi: DoReMiConfig | None = Field(None, description="doremi only: its reference run and settings.")
    sequence_weighting: Literal["none", "loss"] = Field(
        "none", description="'loss' weights each sequence's loss in a batch by softmax(loss / temperature) "
        "× batch size, so harder sequences count more (loss-based sample reweighting).")
    temperature: float = Field(1.0, gt=0, description="sequence_weighting 'loss' only: softmax temperature; "
                               "large is uniform.")
    searched: str | None = Field(None, description="The `tokenmill mix search` folder these weights came from; "
                                 "`tokenmill compare` adds its proxy compute to this run's.")

    @model_validator(mode="after")
    def _check(self) -> "MixtureConfig":
        ends = [p.until for p in self.phases]
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1.0:
            raise ValueError(f"phases must end at increasing fractions and the last at 1.0 (cover the whole "
                             f"budget); got until={ends}")
        if self.online == "doremi" and (self.doremi is None or len(self.phases) > 1):
            raise ValueError("online: doremi needs mixture.doremi.reference and a single phase (its start weights)")
        if self.online == "none" and self.doremi is not None:
            raise ValueError("mixture.doremi is set but online is 'none'; set online: doremi")
        return self

    def domains(self) -> set[str]:
        """Every domain a phase names."""
        return {d for p in self.phases for d in {**(p.weights or {}), **(p.upsample or {})}}


class MetadataConfig(BaseModel):
    """Metadata conditioning then cool-down (MeCo, Gao et al. 2025): each training document is preceded by
    its metadata (no loss on those tokens) until the last ``cooldown_fraction`` of steps, which train on
    plain documents; evaluation never sees metadata."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    field: str = Field("domain", description="Document field to show: a core column (domain, source) or "
                       "meta.<key> (e.g. meta.url); the pack stage keeps it in the token index.")
    template: str = Field("{value}\n\n", description="How the value is written before the document.")
    cooldown_fraction: float = Field(0.1, ge=0, lt=1, description="Final fraction of steps without metadata.")

    @model_validator(mode="after")
    def _template_has_value(self) -> "MetadataConfig":
        if "{value}" not in self.template:
            raise ValueError(f"template must contain {{value}}; got {self.template!r}")
        return self


class TrainConfig(BaseModel):
    """One training run's settings; the network's shape lives in ``ModelConfig``. No setting may be
    inf or NaN, which would surface as a NaN loss (or an optimizer error) only once training runs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seq_len: int = Field(1024, gt=0, description="Tokens per training sequence (≤ the model's max_seq_len).")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward on one device.")
    global_batch_tokens: int = Field(
        16 * 1024,
        gt=0,
        description="Tokens per optimizer step over all devices; gradient accumulation makes up the rest. "
        "Must be a multiple of micro_batch_size · seq_len · world_size.",
    )
    max_steps: int = Field(1000, gt=0, description="Optimizer steps to train for.")
    lr: float = Field(6e-4, ge=0, description="Peak learning rate; 0 leaves the weights as they are (a dry run "
                      "that still measures the loss).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps from ~0 to lr.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="Learning-rate shape after warm-up: cosine decay, warmup-stable-decay, or flat."
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of max_steps spent in the final decay."
    )
    decay_shape: Literal["linear", "sqrt", "cosine"] = Field(
        "linear", description="wsd only: shape of the final decay (1-p, 1-sqrt(p), or half cosine)."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay on ≥2-D weights.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer: OptimizerConfig = Field(
        default_factory=AdamWConfig,
        description="Which optimizer, by name (adamw, muon, galore, sltrain), with its own settings; lr, "
        "betas, eps and weight_decay above apply to whichever AdamW it runs.",
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute precision: auto = bf16 autocast on CUDA with bf16 support, else fp32."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu) or a torch device string.")
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs).")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none",
        description="Recompute activations in the backward pass to save memory: 'full' recomputes every "
        "block, 'selective' as set by selective_ac.",
    )
    selective_ac: Annotated[int, Field(ge=1)] | Literal["op"] = Field(
        "op",
        description="selective only: 'op' keeps each block's matmul and attention outputs and recomputes its "
        "cheap elementwise ops (norms, SiLU, RoPE); an integer k recomputes every k-th block whole.",
    )
    seed: int = Field(0, description="Seed for initialisation and the data order.")
    eval_every: int = Field(200, gt=0, description="Validation loss every this many steps (and at the end).")
    eval_windows_per_domain: int = Field(
        64, gt=0, description="Validation sequences per domain (fixed for the whole run)."
    )
    ckpt_every: int = Field(500, gt=0, description="Checkpoint every this many steps (and at the end).")
    keep_last_k: int = Field(2, gt=0, description="Checkpoints kept on disk; older ones are deleted.")
    log_every: int = Field(10, gt=0, description="Write a metrics line every this many steps.")
    bpb_every: int | None = Field(
        None, gt=0, description="Bits per byte per domain on the held-out documents every this many steps "
        "(and at the end); null turns it off."
    )
    bpb_docs_per_domain: int = Field(
        16, gt=0, description="Held-out documents per domain scored by the in-loop bits-per-byte (keeps it cheap)."
    )
    tensorboard: bool = Field(False, description="Also write metrics to train/tensorboard/ (needs tensorboard).")
    wandb: WandbConfig | None = Field(None, description="Also log metrics to Weights & Biases (needs wandb).")
    domain_weights: dict[str, float] | None = Field(
        None, description="Sampling weight per domain for the loader; None = natural proportions. A shorthand "
        "for a mixture of one phase; exclusive with mixture."
    )
    mixture: MixtureConfig | None = Field(
        None, description="Domain weights over training: phases (end-of-training upsampling), online DoReMi, "
        "loss-based sequence weighting.")
    metadata: MetadataConfig | None = Field(
        None, description="Metadata conditioning then cool-down (MeCo); null trains on plain documents.")
    doc_mask: bool = Field(
        False, description="Stop attention across end-of-document tokens (needs the model's eos_id)."
    )

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainConfig":
        accum = self.grad_accum_steps(world_size=1)
        if getattr(self.optimizer, "per_layer_update", False):
            if accum != 1:
                raise ValueError(f"optimizer.galore.per_layer_update steps each parameter during backward, so a step "
                                 f"is one micro-batch, but global_batch_tokens makes it {accum}: set "
                                 "global_batch_tokens = micro_batch_size × seq_len")
            if self.grad_clip:
                raise ValueError("optimizer.galore.per_layer_update never holds every gradient at once, so there "
                                 "is no global norm to clip by: set grad_clip: 0")
        return self

    @model_validator(mode="after")
    def _one_mixture(self) -> "TrainConfig":
        if self.domain_weights is not None and self.mixture is not None:
            raise ValueError("set train.domain_weights or train.mixture, not both (domain_weights is a "
                             "one-phase mixture: mixture.phases: [{until: 1.0, weights: ...}])")
        if self.domain_weights is not None:  # validated as a phase's weights are
            MixturePhase(until=1.0, weights=self.domain_weights)
        return self

    def mixture_phases(self) -> MixtureConfig:
        """The mixture in full form, whichever way the recipe wrote it."""
        if self.mixture is not None:
            return self.mixture
        return MixtureConfig(phases=[MixturePhase(until=1.0, weights=self.domain_weights)])

    def phase_end_steps(self) -> list[int]:
        """The optimizer step at which each phase ends (the last: max_steps)."""
        return [round(p.until * self.max_steps) for p in self.mixture_phases().phases]

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` devices."""
        per_pass = self.micro_batch_size * self.seq_len * world_size
        if self.global_batch_tokens % per_pass:
            raise TokenmillError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) × seq_len ({self.seq_len}) × world_size ({world_size}) "
                f"= {per_pass}: change global_batch_tokens or micro_batch_size"
            )
        return self.global_batch_tokens // per_pass
