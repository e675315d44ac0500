"""The training loop: resumable, bf16 autocast, gradient accumulation, FSDP2 under torchrun, honest MFU.

The loop never synchronises with the GPU inside a step: per-step losses, gradient norms and per-domain
loss sums stay on the device and are read back (and, under torchrun, reduced over ranks in one
collective) at log, eval and checkpoint steps, where every one is checked for NaN/Inf (so the error
names the exact step, and no checkpoint is written after a bad step). Metric lines carry the mean loss
and gradient norm over the steps since the previous line.

Under ``torchrun`` every rank runs this same function: each reads its rows of the global batch (so
the run sees exactly the sequences a single process would), FSDP2 shards the model, and rank 0 alone
writes metrics. Evaluations run on every rank, as sharded forwards need all of them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.model.hf import load_hf_weights
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.tokens.loader import TokenDataset, TokenLoader, eval_windows
from tokenmill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.distributed import Distributed, setup_distributed
from tokenmill.train.metrics import MetricsSink
from tokenmill.train.optim import build_adamw
from tokenmill.train.parallelize import parallelize
from tokenmill.train.schedule import lr_multiplier

# Dense bf16 tensor-core peak per device, matched (first hit) by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16(dtype: str, device: torch.device) -> bool:
    if dtype == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return dtype == "bfloat16"


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's bf16 peak, or None where MFU would be meaningless (CPU, fp32, unknown GPU)."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float | None:
    """Most memory the caching allocator has handed out since the start, or None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def evaluate(
    model: Llama,
    windows: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    bf16: bool,
) -> dict[str, float]:
    """Mean next-token loss per domain over fixed windows; ``val_loss`` averages over all windows."""
    model.eval()
    sums = {}
    for domain, (x, y) in windows.items():
        total = torch.zeros((), device=device)
        for xb, yb in zip(x.split(cfg.micro_batch_size), y.split(cfg.micro_batch_size)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(xb.to(device), yb.to(device), doc_mask=cfg.doc_mask)
            total += loss * len(xb)
        sums[domain] = total.item()
    model.train()
    counts = {domain: len(x) for domain, (x, _) in windows.items()}
    result = {f"val_loss/{d}": total / counts[d] for d, total in sums.items()}
    result["val_loss"] = sum(sums.values()) / sum(counts.values())
    return result


class _Interval:
    """What happened since the last metric line, kept on the device: each step's loss and gradient
    norm, and per-domain sums of sequence losses with their counts."""

    def __init__(self, n_domains: int, device: torch.device):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.domain_loss = torch.zeros(n_domains, device=device)
        self.domain_seqs = torch.zeros(n_domains, device=device)

    def add_sequences(self, seq_loss: torch.Tensor, domain: torch.Tensor) -> None:
        self.domain_loss.index_add_(0, domain, seq_loss.detach())
        self.domain_seqs.index_add_(0, domain, torch.ones_like(seq_loss))

    def read(self, job: Distributed) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor]:
        """Per-step losses averaged over ranks, gradient norms (already global), and per-domain loss
        sums and counts over all ranks; then start a new interval."""
        losses, norms = (torch.stack(v) for v in zip(*self.steps))
        n = len(self.steps)
        packed = job.sum(torch.cat([losses.float(), self.domain_loss, self.domain_seqs]))
        domain_loss, domain_seqs = packed[n:].view(2, -1)
        self.steps.clear()
        self.domain_loss.zero_()
        self.domain_seqs.zero_()
        return (packed[:n] / job.world_size).tolist(), norms.tolist(), domain_loss.cpu(), domain_seqs.cpu()


def _resume_loader(loader: TokenLoader, saved: dict[str, Any]) -> None:
    """The loader counts micro-batches of ``batch_size · world_size`` sequences; the saved position goes
    through the number of sequences read, so a run resumes on another world size or micro-batch size
    (seed and seq_len must still match, which the loader checks)."""
    per_batch = loader.batch_size * loader.world_size
    loader.load_state_dict({**saved, "step": saved["step"] * saved["global_batch"] // per_batch,
                            "global_batch": per_batch})


def _bits_per_byte(model: Llama, tokenizer, docs: pa.Table, cfg: TrainConfig, device, bf16: bool) -> dict:
    """In-loop bits per byte per domain on (a capped number of) held-out documents."""
    from tokenmill.model.bpb import bits_per_byte

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        result = bits_per_byte(model, tokenizer, docs, seq_len=cfg.seq_len, batch_size=cfg.micro_batch_size,
                               device=device, max_docs_per_domain=cfg.bpb_docs_per_domain)
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
    """
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TokenmillError(
            f"train seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        )
    if cfg.doc_mask and model_cfg.eos_id is None:
        raise TokenmillError("train doc_mask=true needs model eos_id (the tokenizer's end-of-document id)")
    if init_model is not None and init_model.cfg != model_cfg:
        raise TokenmillError("init_model was built from a different ModelConfig than model_cfg: pass its .cfg")
    if cfg.bpb_every and (bpb_docs is None or tokenizer_dir is None):
        raise TokenmillError("train.bpb_every needs the held-out documents and the tokenizer folder "
                             "(bpb_docs, tokenizer_dir); set it to null to train without it")
    job = setup_distributed(resolve_device(cfg.device))
    try:
        return _train(job, model_cfg, cfg, Path(tokens_dir), Path(out_dir), val_tokens_dir, bpb_docs,
                      tokenizer_dir, init_model, progress)
    finally:
        job.close()


def _train(
    job: Distributed,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tokens_dir: Path,
    out_dir: Path,
    val_tokens_dir: Path | None,
    bpb_docs: pa.Table | None,
    tokenizer_dir: Path | None,
    init_model: Llama | None,
    progress: bool,
) -> dict[str, Any]:
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = job.device
    bf16 = uses_bf16(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32

    resume_from = latest_checkpoint(ckpt_dir)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and as in one process
    model = init_model or Llama(model_cfg)
    if init_model is None and model_cfg.init_from and resume_from is None:
        load_hf_weights(model, model_cfg.init_from)
    model = parallelize(model.to(device).train(), cfg, job.mesh, bf16=bf16)
    optimizer = build_adamw(model, cfg, device)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if ModelConfig.model_validate(state["model_config"]) != model_cfg:
            raise TokenmillError(
                f"{resume_from} holds a different model: use a new out_dir or the same model config"
            )
    sink = None
    if job.is_main:
        run_config = {"model": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
        sink = MetricsSink(out_dir, cfg, state["step"], run_config)
    history = sink.history if sink else []
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    last_val = next((r for r in reversed(history) if "val_loss" in r), {})

    dataset = TokenDataset(tokens_dir)
    if cfg.doc_mask and dataset.eos_id != model_cfg.eos_id:
        raise TokenmillError(
            f"model eos_id={model_cfg.eos_id} but {tokens_dir} ends documents with {dataset.eos_id}"
        )
    accum = cfg.grad_accum_steps(job.world_size)
    loader = TokenLoader(dataset, cfg.seq_len, cfg.micro_batch_size, cfg.seed, domain_weights=cfg.domain_weights,
                         rank=job.rank, world_size=job.world_size)
    if resume_from is not None:
        _resume_loader(loader, state["loader"])
    batches = iter(loader)
    windows = {}
    if val_tokens_dir is not None:
        windows = eval_windows(TokenDataset(val_tokens_dir), cfg.seq_len, cfg.eval_windows_per_domain)
    tokenizer = None
    if cfg.bpb_every:
        from tokenmill.tokens.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device, bf16)
    interval = _Interval(len(loader.domains), device)

    def train_step(step: int) -> None:
        """Optimizer step ``step`` (1-based) over ``accum`` micro-batches."""
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(cfg, step - 1)
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y, domain = (t.to(device, non_blocking=True) for t in next(batches))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, token_loss = model(x, y, doc_mask=cfg.doc_mask, reduction="none")
            seq_loss = token_loss.mean(dim=1)
            loss = seq_loss.mean()
            (loss / accum).backward()
            total += loss.detach()
            interval.add_sequences(seq_loss, domain)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):  # sharded: already the global norm, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        interval.steps.append((total / accum, grad_norm))

    start_step = step = state["step"]
    t_start = t_mark = time.perf_counter()
    mark_step = start_step

    def record(step: int, **values: Any) -> dict[str, Any]:
        return {"step": step, "tokens": step * cfg.global_batch_tokens, **values}

    def write(rec: dict[str, Any]) -> None:
        if sink is not None:
            sink.write(rec)

    try:
        with tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and job.is_main), unit="step",
                  desc="train") as bar:
            for step in range(start_step + 1, cfg.max_steps + 1):
                try:
                    train_step(step)
                except torch.cuda.OutOfMemoryError as e:
                    raise TokenmillError(
                        f"CUDA out of memory at step {step} with micro_batch_size={cfg.micro_batch_size}, "
                        f"seq_len={cfg.seq_len}: lower micro_batch_size (gradient accumulation keeps "
                        f"global_batch_tokens), turn on activation_checkpointing, or lower seq_len"
                    ) from e
                bar.update()
                last = step == cfg.max_steps
                do_eval = bool(windows) and (step % cfg.eval_every == 0 or last)
                do_bpb = bool(cfg.bpb_every) and (step % cfg.bpb_every == 0 or last)
                do_ckpt = step % cfg.ckpt_every == 0 or last
                if not (step % cfg.log_every == 0 or do_eval or do_bpb or do_ckpt):
                    continue

                losses, norms, domain_loss, domain_seqs = interval.read(job)
                for i, (loss, norm) in enumerate(zip(losses, norms)):
                    if not (math.isfinite(loss) and math.isfinite(norm)):
                        raise TokenmillError(
                            f"loss {loss}, gradient norm {norm} at step {step - len(losses) + 1 + i}; last good "
                            f"checkpoint: {latest_checkpoint(ckpt_dir) or 'none saved yet'}. Lower lr or raise "
                            f"warmup_steps, then resume or restart."
                        )
                now = time.perf_counter()
                tokens_per_s = (step - mark_step) * cfg.global_batch_tokens / (now - t_mark)
                per_domain = {f"loss/{d}": (domain_loss[i] / domain_seqs[i]).item()
                              for i, d in enumerate(loader.domains) if domain_seqs[i] > 0}
                last_train = record(
                    step,
                    loss=sum(losses) / len(losses),
                    lr=optimizer.param_groups[0]["lr"],
                    grad_norm=sum(norms) / len(norms),
                    tokens_per_s=tokens_per_s,
                    mfu=flops_per_token * tokens_per_s / peak if peak else None,
                    peak_memory_gib=peak_memory_gib(device),
                    elapsed_s=state["elapsed_s"] + now - t_start,
                    **per_domain,
                )
                write(last_train)
                bar.set_postfix(loss=f"{last_train['loss']:.3f}", lr=f"{last_train['lr']:.2e}")
                if do_eval:
                    last_val = record(step, **evaluate(model, windows, cfg, device, bf16))
                    write(last_val)
                if do_bpb:
                    write(record(step, **_bits_per_byte(model, tokenizer, bpb_docs, cfg, device, bf16)))
                if do_ckpt:
                    ckpt_state = {
                        "model_config": model_cfg.model_dump(mode="json"),
                        "train_config": cfg.model_dump(mode="json"),
                        "loader": loader.state_dict(),
                        "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start,
                    }
                    save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_state, cfg.keep_last_k)
                t_mark, mark_step = time.perf_counter(), step  # eval and checkpoint time is not throughput
    finally:
        if sink is not None:
            sink.close()

    seconds = time.perf_counter() - t_start
    return {
        "steps": step,
        "tokens": step * cfg.global_batch_tokens,
        "final_loss": last_train.get("loss"),
        "final_val_loss": last_val.get("val_loss"),
        "seconds": seconds,
        "tokens_per_s": (step - start_step) * cfg.global_batch_tokens / seconds,
        "params": model.num_params(),
        "world_size": job.world_size,
    }
