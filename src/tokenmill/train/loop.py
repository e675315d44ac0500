"""The training loop: resumable, bf16 autocast, gradient accumulation, FSDP2 under torchrun, honest MFU.

The loop never synchronises with the GPU inside a step: per-step losses, gradient norms and per-domain
loss sums stay on the device and are read back (and, under torchrun, reduced over ranks in one
collective) at log, eval and checkpoint steps, where every one is checked for NaN/Inf (so the error
names the exact step, and no checkpoint is written after a bad step). Metric lines carry the mean loss
and gradient norm over the steps since the previous line.

Under ``torchrun`` every rank runs this same function: each reads its rows of the global batch (so
the run sees exactly the sequences a single process would), FSDP2 shards the model, and rank 0 alone
writes metrics (and their console lines). Evaluations run on every rank, as sharded forwards need all of them.

A run is built once (``_setup`` returns a ``_Run``: model, optimizer, data, precision, metrics sink);
``_loop`` then drives ``_train_step`` (whose objective is ``_sequence_losses``), ``_log_train``,
the evaluations and ``_save`` at their cadence, and ``_summary`` ends it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.train.sources import grow
from tokenmill.model.hf import load_hf_weights
from tokenmill.model.build import build_model
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.tokens.loader import TokenDataset, TokenLoader, eval_windows
from tokenmill.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from tokenmill.train.config import SLTrainConfig, TrainConfig
from tokenmill.train.device import peak_flops, peak_memory_gib, resolve_device, uses_bf16
from tokenmill.train.distributed import Distributed, setup_distributed
from tokenmill.train.memory import measure, peak_bytes
from tokenmill.train.metrics import MetricsSink, console_line, say
from tokenmill.train.mixing import DoReMi, build_doremi, build_mixture, metadata_view, sequence_weights
from tokenmill.train.objectives import EVAL_G_OFFSET, Objective, build_objective
from tokenmill.train.optim import PerLayer, build_optimizer
from tokenmill.train.parallelize import parallelize
from tokenmill.train.schedule import lr_multiplier
from tokenmill.train.sltrain import apply_sltrain


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    windows: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    bf16: bool,
    objective: Objective,
    progress: bool = False,
) -> dict[str, float]:
    """The objective's mean loss per domain over fixed windows (masked and corrupted the same way at every
    evaluation); ``val_loss`` averages over all windows. ``progress`` draws a passing bar over the
    micro-batches (the final validation can take a while)."""
    model.eval()
    sums = {}
    n_batches = sum(math.ceil(len(x) / cfg.micro_batch_size) for x, _ in windows.values())
    with tqdm(total=n_batches, desc="val", unit="batch", leave=False, disable=not progress) as bar:
        for d, (domain, (x, y)) in enumerate(windows.items()):
            total = torch.zeros((), device=device)
            g = EVAL_G_OFFSET + (d << 24) + np.arange(len(x))
            for xb, yb, gb in zip(x.split(cfg.micro_batch_size), y.split(cfg.micro_batch_size),
                                  np.array_split(g, math.ceil(len(x) / cfg.micro_batch_size))):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    total += objective.losses(model, xb, yb, gb, device, cfg.doc_mask).sum()
                bar.update()
            sums[domain] = total.item()
    model.train()
    counts = {domain: len(x) for domain, (x, _) in windows.items()}
    result = {f"val_loss/{d}": total / counts[d] for d, total in sums.items()}
    result["val_loss"] = sum(sums.values()) / sum(counts.values())
    return result


class _Interval:
    """What happened since the last metric line, kept on the device: each step's loss and gradient
    norm, per-domain sums of sequence losses with their counts, and the objective's parts (ELECTRA's
    MLM and replaced-token losses and accuracy), one value per micro-batch."""

    def __init__(self, n_domains: int, device: torch.device):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.domain_loss = torch.zeros(n_domains, device=device)
        self.domain_seqs = torch.zeros(n_domains, device=device)
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add_sequences(self, seq_loss: torch.Tensor, domain: torch.Tensor) -> None:
        self.domain_loss.index_add_(0, domain, seq_loss.detach())
        self.domain_seqs.index_add_(0, domain, torch.ones_like(seq_loss))

    def add_parts(self, parts: dict[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value.detach().float())

    def read(self, job: Distributed) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor, dict[str, float]]:
        """Per-step losses averaged over ranks, gradient norms (already global), per-domain loss sums and
        counts over all ranks, and each part's mean over micro-batches and ranks; then start a new interval."""
        losses, norms = (torch.stack(v) for v in zip(*self.steps))
        n, names = len(self.steps), sorted(self.parts)
        part_means = [torch.stack(self.parts[name]).mean() for name in names]
        packed = job.sum(torch.cat([losses.float(), self.domain_loss, self.domain_seqs, *(p[None] for p in part_means)]))
        domain_loss, domain_seqs = packed[n:n + 2 * len(self.domain_loss)].view(2, -1)
        parts = dict(zip(names, (packed[len(packed) - len(names):] / job.world_size).tolist()))
        self.steps.clear()
        self.domain_loss.zero_()
        self.domain_seqs.zero_()
        self.parts.clear()
        return (packed[:n] / job.world_size).tolist(), norms.tolist(), domain_loss.cpu(), domain_seqs.cpu(), parts


def _resume_loader(loader: TokenLoader, saved: dict[str, Any]) -> None:
    """The loader counts micro-batches of ``batch_size · world_size`` sequences; the saved position goes
    through the number of sequences read, so a run resumes on another world size or micro-batch size
    (seed and seq_len must still match, which the loader checks)."""
    per_batch = loader.batch_size * loader.world_size
    loader.load_state_dict({**saved, "step": saved["step"] * saved["global_batch"] // per_batch,
                            "global_batch": per_batch})


def _bits_per_byte(model: Llama, tokenizer, docs: pa.Table, cfg: TrainConfig, device, bf16: bool,
                   progress: bool) -> dict:
    """In-loop bits per byte per domain on (a capped number of) held-out documents; a bar with
    ``progress``, else silent (the loop prints the result's line)."""
    from tokenmill.model.bpb import bits_per_byte

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        result = bits_per_byte(model, tokenizer, docs, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size,
                               device=device, max_docs_per_domain=cfg.bpb_docs_per_domain,
                               progress=True if progress else None)
    return {**{f"bpb/{d}": s["bpb"] for d, s in result["domains"].items()}, "bpb": result["overall"]["bpb"]}


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tokens_dir: Path,
    out_dir: Path,
    *,
    val_tokens_dir: Path | None = None,
    bpb_docs: pa.Table | None = None,
    tokenizer_dir: Path | None = None,
    init_model: Llama | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue training) into ``out_dir``: ``checkpoints/step-N/`` and ``metrics.jsonl``.

    Resumes from the newest checkpoint in ``out_dir/checkpoints`` if there is one (``init_model``,
    or ``model_cfg.init_from``, the starting point for continued pretraining, is then ignored).
    ``bpb_docs`` (held-out documents: ``text``, ``domain``) and ``tokenizer_dir`` feed the in-loop
    bits per byte of ``cfg.bpb_every``. Under ``torchrun`` every rank calls this; it joins the
    process group (or uses the one already initialised). Returns a summary of the run.

    Rank 0 prints a line to stdout at every metrics record (training, validation, bits per byte) and on
    resume, whatever ``progress`` is: logs of runs without a terminal need them. ``progress`` adds bars.
    """
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TokenmillError(
            f"train seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        )
    if cfg.doc_mask and model_cfg.eos_id is None:
        raise TokenmillError("train doc_mask=true needs model eos_id (the tokenizer's end-of-document id)")
    if init_model is not None and init_model.cfg != model_cfg:
        raise TokenmillError("init_model was built from a different ModelConfig than model_cfg: pass its .cfg")
    if cfg.bpb_every and model_cfg.objective != "clm":
        raise TokenmillError(f"train.bpb_every measures a decoder's bits per byte; objective {model_cfg.objective} "
                             "is evaluated after training (the eval stage): set bpb_every to null")
    if cfg.bpb_every and (bpb_docs is None or tokenizer_dir is None):
        raise TokenmillError("train.bpb_every needs the held-out documents and the tokenizer folder "
                             "(bpb_docs, tokenizer_dir); set it to null to train without it")
    job = setup_distributed(resolve_device(cfg.device))
    try:
        run = _setup(job, model_cfg, cfg, Path(tokens_dir), Path(out_dir), val_tokens_dir=val_tokens_dir,
                     bpb_docs=bpb_docs, tokenizer_dir=tokenizer_dir, init_model=init_model)
        try:
            return _loop(run, progress)
        finally:
            if run.sink is not None:
                run.sink.close()
    finally:
        job.close()


@dataclass
class _Run:
    """Everything a run builds once, before its first step, and what the step, the metric lines, the
    evaluations and the checkpoints read. Another optimizer or objective changes how it is built or
    what one step does, not the loop around them."""

    job: Distributed
    model_cfg: ModelConfig
    cfg: TrainConfig
    ckpt_dir: Path
    model: Llama
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    accum: int  # micro-batches per optimizer step on this rank
    bf16: bool
    interval: _Interval
    windows: dict[str, tuple[torch.Tensor, torch.Tensor]]  # validation windows per domain; empty: no eval
    bpb_docs: pa.Table | None
    tokenizer: Any  # for the in-loop bits per byte and the objective's special tokens; None when neither needs it
    objective: Objective
    flops_per_token: float
    peak: float | None  # the device's peak FLOP/s, for MFU
    start_step: int
    resumed_from: Path | None  # the checkpoint this run continues, if any
    elapsed_s: float  # training time before this process started: the resumed checkpoint's
    sink: MetricsSink | None  # rank 0 only
    last_train: dict[str, Any]  # the newest training and validation records, for the summary
    last_val: dict[str, Any]
    doremi: DoReMi | None  # domain loss weights, updated after every step
    memory: dict[str, int] | None = None  # tensor bytes after this process's first optimizer step
    step_weights: list[dict[str, Any]] | None = None  # doremi: each step's weights, until the next metric line

    @property
    def device(self) -> torch.device:
        return self.job.device

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def record(self, step: int, **values: Any) -> dict[str, Any]:
        return {"step": step, "tokens": step * self.cfg.global_batch_tokens, **values}

    def write(self, record: dict[str, Any], *, eta_s: float | None = None, seconds: float | None = None) -> None:
        """To the sink and, as a line, to the console (rank 0 only, as both are)."""
        if self.sink is not None:
            self.sink.write(record)
            say(console_line(record, self.cfg.max_steps, eta_s=eta_s, seconds=seconds))


def _setup(
    job: Distributed,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tokens_dir: Path,
    out_dir: Path,
    *,
    val_tokens_dir: Path | None,
    bpb_docs: pa.Table | None,
    tokenizer_dir: Path | None,
    init_model: Llama | None,
) -> _Run:
    """Build the model (fresh, from ``init_model``/``init_from``/``grow_from``, or resumed), its optimizer, the data
    and the metrics sink; finish the pruning a run killed after its last save left undone."""
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = job.device
    bf16 = uses_bf16(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32

    resume_from = latest_checkpoint(ckpt_dir)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and as in one process
    model = init_model or build_model(model_cfg)
    if init_model is None and model_cfg.init_from and resume_from is None:
        load_hf_weights(model, model_cfg.init_from)
    if init_model is None and model_cfg.grow_from and resume_from is None:
        grow(model)
    if isinstance(cfg.optimizer, SLTrainConfig):  # before parallelize: its wrappers and shards see the factors
        apply_sltrain(model, cfg.optimizer, model_cfg, cfg.seed)
    model = parallelize(model.to(device).train(), cfg, job.mesh, bf16=bf16)
    optimizer = build_optimizer(model, cfg, device)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if ModelConfig.model_validate(state["model_config"]) != model_cfg:
            raise TokenmillError(
                f"{resume_from} holds a different model: use a new out_dir or the same model config"
            )
        if job.is_main:
            prune_checkpoints(ckpt_dir, cfg.keep_last_k)

    tokenizer = None
    if cfg.bpb_every or model_cfg.objective != "clm":
        from tokenmill.tokens.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    objective = build_objective(model_cfg, cfg, tokenizer)
    dataset = TokenDataset(tokens_dir)
    if cfg.doc_mask and dataset.eos_id != model_cfg.eos_id:
        raise TokenmillError(
            f"model eos_id={model_cfg.eos_id} but {tokens_dir} ends documents with {dataset.eos_id}"
        )
    metadata, metadata_until = metadata_view(cfg, dataset, tokenizer_dir)
    loader = TokenLoader(dataset, objective.window_len - 1, cfg.micro_batch_size, cfg.seed, rank=job.rank,
                         world_size=job.world_size, mixture=build_mixture(cfg, dataset), metadata=metadata,
                         metadata_until=metadata_until)
    doremi = build_doremi(cfg, dataset)
    if resume_from is not None:
        _resume_loader(loader, state["loader"])
        if doremi is not None:
            doremi.load_state_dict(state["doremi"])
    windows = {}
    if val_tokens_dir is not None:
        windows = eval_windows(TokenDataset(val_tokens_dir), objective.window_len - 1, cfg.eval_windows_per_domain)

    sink = None
    if job.is_main:
        run_config = {"model": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
        sink = MetricsSink(out_dir, cfg, state["step"], run_config)
    history = sink.history if sink else []
    return _Run(
        job=job, model_cfg=model_cfg, cfg=cfg, ckpt_dir=ckpt_dir, model=model, optimizer=optimizer,
        loader=loader, batches=iter(loader), accum=cfg.grad_accum_steps(job.world_size), bf16=bf16,
        interval=_Interval(len(loader.domains), device), windows=windows, bpb_docs=bpb_docs,
        tokenizer=tokenizer, objective=objective, flops_per_token=_dense_flops_per_token(model_cfg, cfg.seq_len, objective),
        peak=peak_flops(device, bf16),
        start_step=state["step"], resumed_from=resume_from, elapsed_s=state["elapsed_s"], sink=sink,
        last_train=next((r for r in reversed(history) if "loss" in r), {}),
        last_val=next((r for r in reversed(history) if "val_loss" in r), {}),
        doremi=doremi, step_weights=[] if doremi is not None else None,
    )


def _dense_flops_per_token(model_cfg: ModelConfig, seq_len: int, objective: Objective) -> float:
    """The model's matmul FLOPs per token as its dense shape computes them: a reparametrised model
    (SLTrain) has fewer parameters but still multiplies by dense weights. Span corruption's decoder reads
    its target length per sequence of ``seq_len`` input tokens."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    shapes = getattr(objective, "shapes", None)
    if shapes is not None:
        return model.flops_per_token(seq_len, target_len=shapes.target_len)
    return model.flops_per_token(seq_len)


class _Clock:
    """Throughput since the last metric line (evaluation and checkpoint time excluded) and training time
    over the whole run, resumes included."""

    def __init__(self, step: int, elapsed_before: float):
        self.start = self.mark = time.perf_counter()
        self.start_step = self.mark_step = step
        self.before = elapsed_before

    def lap(self, step: int, tokens_per_step: int) -> tuple[float, float]:
        """(tokens per second since the mark, elapsed seconds), both as of now."""
        now = time.perf_counter()
        return (step - self.mark_step) * tokens_per_step / (now - self.mark), self.before + now - self.start

    def elapsed_s(self) -> float:
        return self.before + time.perf_counter() - self.start

    def eta_s(self, step: int, max_steps: int) -> float:
        """Seconds left at this process's pace so far, evaluations and checkpoints included."""
        return (time.perf_counter() - self.start) / (step - self.start_step) * (max_steps - step)

    def restart(self, step: int) -> None:
        self.mark, self.mark_step = time.perf_counter(), step


def _loop(run: _Run, progress: bool) -> dict[str, Any]:
    """Steps from the resumed one to ``max_steps``, with metric lines, evaluations and checkpoints at
    their cadence; returns the summary."""
    cfg = run.cfg
    step = run.start_step
    bars = progress and run.job.is_main
    if run.resumed_from is not None and run.job.is_main:
        say(f"resuming from step {step} (checkpoint {run.resumed_from})")
    clock = _Clock(step, run.elapsed_s)
    with tqdm(total=cfg.max_steps, initial=step, disable=not bars, unit="step", desc="train") as bar:
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            try:
                _train_step(run, step)
            except torch.cuda.OutOfMemoryError as e:
                raise TokenmillError(
                    f"CUDA out of memory at step {step} with micro_batch_size={cfg.micro_batch_size}, "
                    f"seq_len={cfg.seq_len}: lower micro_batch_size (gradient accumulation keeps "
                    f"global_batch_tokens), turn on activation_checkpointing, or lower seq_len"
                ) from e
            bar.update()
            last = step == cfg.max_steps
            do_eval = bool(run.windows) and (step % cfg.eval_every == 0 or last)
            do_bpb = bool(cfg.bpb_every) and (step % cfg.bpb_every == 0 or last)
            do_ckpt = step % cfg.ckpt_every == 0 or last
            if not (step % cfg.log_every == 0 or do_eval or do_bpb or do_ckpt):
                continue
            _log_train(run, step, clock)
            bar.set_postfix(loss=f"{run.last_train['loss']:.3f}", lr=f"{run.last_train['lr']:.2e}")
            if do_eval:
                run.last_val = _evaluate(run, step, lambda: validation_loss(run.model, run.windows, cfg, run.device,
                                                                            run.bf16, run.objective, bars))
            if do_bpb:
                _evaluate(run, step, lambda: _bits_per_byte(run.model, run.tokenizer, run.bpb_docs, cfg, run.device,
                                                            run.bf16, bars))
            if do_ckpt:
                _save(run, step, clock.elapsed_s())
            clock.restart(step)  # eval and checkpoint time is not throughput
    return _summary(run, step, clock.elapsed_s())


def _evaluate(run: _Run, step: int, evaluation: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """Run one evaluation and write its record, with the seconds it took on its console line."""
    t0 = time.perf_counter()
    record = run.record(step, **evaluation())
    run.write(record, seconds=time.perf_counter() - t0)
    return record


def _summary(run: _Run, step: int, seconds: float) -> dict[str, Any]:
    """``seconds`` is the whole run's training time, resumes included, so a rerun that found nothing
    left to train (killed after its last checkpoint) still reports the run's true throughput."""
    tokens = step * run.cfg.global_batch_tokens
    return {
        "steps": step,
        "tokens": tokens,
        "final_loss": run.last_train.get("loss"),
        "final_val_loss": run.last_val.get("val_loss"),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "params": run.model.num_params(),
        "world_size": run.job.world_size,
        "memory": _memory(run),
        **({"doremi_mean_weights": dict(zip(run.loader.domains, run.doremi.mean.round(6).tolist()))}
           if run.doremi is not None else {}),
    }


def _memory(run: _Run) -> dict[str, Any] | None:
    """This rank's tensor bytes and the process's peak; None when this process trained no step."""
    if run.memory is None:
        return None
    peak, kind = peak_bytes(run.device)
    return {**run.memory, "peak_bytes": peak, "peak_kind": kind}


def _train_step(run: _Run, step: int) -> None:
    """Optimizer step ``step`` (1-based) over ``run.accum`` micro-batches; its loss and gradient norm
    stay on the device, in ``run.interval``."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_multiplier(cfg, step - 1)
    if run.doremi is not None:
        step_loss = torch.zeros(len(run.loader.domains), device=run.device)
        step_seqs = torch.zeros_like(step_loss)
    weighting = run.cfg.mixture.sequence_weighting if run.cfg.mixture else "none"
    total = torch.zeros((), device=run.device)
    for _ in range(run.accum):
        x, y, domain = next(run.batches)
        domain = domain.to(run.device, non_blocking=True)
        with run.autocast():
            seq_loss = run.objective.losses(run.model, x, y, run.loader.rows(run.loader.step - 1), run.device,
                                            run.cfg.doc_mask)
        loss = seq_loss.mean()
        weights = torch.ones_like(seq_loss)
        if run.doremi is not None:
            weights = weights * run.doremi.sequence_weights(domain)
        if weighting == "loss":
            weights = weights * sequence_weights(seq_loss, run.cfg.mixture.temperature)
        ((seq_loss * weights).mean() / run.accum).backward()
        total += loss.detach()
        run.interval.add_sequences(seq_loss, domain)
        run.interval.add_parts(getattr(run.objective, "parts", {}))
        if run.doremi is not None:
            step_loss.index_add_(0, domain, seq_loss.detach().float())
            step_seqs.index_add_(0, domain, torch.ones_like(seq_loss, dtype=torch.float))
    if isinstance(run.optimizer, PerLayer):  # stepped parameter by parameter during backward
        grad_norm = run.optimizer.grad_norm()
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    if isinstance(grad_norm, DTensor):  # sharded: already the global norm, replicated on every rank
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    if run.memory is None:  # every gradient and optimizer state tensor exists now, and only now
        run.memory = measure(run.model, run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    run.interval.steps.append((total / run.accum, grad_norm))
    if run.doremi is not None:  # every rank gets the same sums, so the same next weights
        step_loss, step_seqs = run.job.sum(torch.cat([step_loss, step_seqs])).cpu().double().numpy().reshape(2, -1)
        run.step_weights.append(run.record(step, **{f"weight/{d}": w for d, w in
                                                    zip(run.loader.domains, run.doremi.weights.tolist())}))
        run.doremi.update(step_loss, step_seqs)


def _log_train(run: _Run, step: int, clock: _Clock) -> None:
    """Read the interval back from the device (reduced over ranks), refuse a non-finite step, and write
    the metric line and its console line."""
    losses, norms, domain_loss, domain_seqs, parts = run.interval.read(run.job)
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TokenmillError(
                f"loss {loss}, gradient norm {norm} at step {step - len(losses) + 1 + i}; last good "
                f"checkpoint: {latest_checkpoint(run.ckpt_dir) or 'none saved yet'}. Lower lr or raise "
                f"warmup_steps, then resume or restart."
            )
    tokens_per_s, elapsed_s = clock.lap(step, run.cfg.global_batch_tokens)  # after the read: the GPU is done
    per_domain = {f"loss/{d}": (domain_loss[i] / domain_seqs[i]).item()
                  for i, d in enumerate(run.loader.domains) if domain_seqs[i] > 0}
    realised = {f"mix/{d}": (domain_seqs[i] / domain_seqs.sum()).item() for i, d in enumerate(run.loader.domains)}
    if run.step_weights and run.sink is not None:  # doremi: the weights each step trained with
        for record in run.step_weights:
            run.sink.write(record)
    if run.step_weights:
        run.step_weights.clear()
    run.last_train = run.record(
        step,
        loss=sum(losses) / len(losses),
        lr=run.optimizer.param_groups[0]["lr"],
        grad_norm=sum(norms) / len(norms),
        tokens_per_s=tokens_per_s,
        mfu=run.flops_per_token * tokens_per_s / run.peak if run.peak else None,
        peak_memory_gib=peak_memory_gib(run.device),
        elapsed_s=elapsed_s,
        **per_domain,
        **realised,
        **parts,
    )
    run.write(run.last_train, eta_s=clock.eta_s(step, run.cfg.max_steps))


def _save(run: _Run, step: int, elapsed_s: float) -> None:
    state = {
        "model_config": run.model_cfg.model_dump(mode="json"),
        "train_config": run.cfg.model_dump(mode="json"),
        "loader": run.loader.state_dict(),
        "elapsed_s": elapsed_s,
        **({"doremi": run.doremi.state_dict()} if run.doremi is not None else {}),
    }
    save_checkpoint(run.ckpt_dir, step, run.model, run.optimizer, state, run.cfg.keep_last_k)
