"""The single-device training loop: resumable, bf16 autocast, gradient accumulation, honest MFU.

The loop never synchronises with the GPU inside a step: per-step losses stay on the device and are
read back at log, eval and checkpoint steps, where every one is checked for NaN/Inf (so the error
names the exact step, and no checkpoint is written after a bad step). Metric lines carry the mean loss
and gradient norm over the steps since the previous line.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.tokens.loader import TokenDataset, TokenLoader, eval_windows
from tokenmill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.optim import build_adamw
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


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Rewrite ``path`` keeping only records up to the checkpoint being resumed, so a resumed run
    appends without duplicates; a line torn by a crash is dropped."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= upto_step:
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


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


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tokens_dir: Path,
    out_dir: Path,
    *,
    val_tokens_dir: Path | None = None,
    init_model: Llama | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue training) into ``out_dir``: ``checkpoints/step-N/`` and ``metrics.jsonl``.

    Resumes from the newest checkpoint in ``out_dir/checkpoints`` if there is one (``init_model``,
    the starting point for continued pretraining, is then ignored). Returns a summary of the run.
    """
    out_dir = Path(out_dir)
    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TokenmillError(
            f"train seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        )
    if cfg.doc_mask and model_cfg.eos_id is None:
        raise TokenmillError("train doc_mask=true needs model eos_id (the tokenizer's end-of-document id)")
    if init_model is not None and init_model.cfg != model_cfg:
        raise TokenmillError("init_model was built from a different ModelConfig than model_cfg: pass its .cfg")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    bf16 = uses_bf16(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32

    torch.manual_seed(cfg.seed)
    model = (init_model or Llama(model_cfg)).to(device)
    model.train()
    optimizer = build_adamw(model, cfg, device)
    resume_from = latest_checkpoint(ckpt_dir)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if ModelConfig.model_validate(state["model_config"]) != model_cfg:
            raise TokenmillError(
                f"{resume_from} holds a different model: use a new out_dir or the same model config"
            )
    history = _read_metrics(metrics_path, state["step"])
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    last_val = next((r for r in reversed(history) if "val_loss" in r), {})

    dataset = TokenDataset(tokens_dir)
    if cfg.doc_mask and dataset.eos_id != model_cfg.eos_id:
        raise TokenmillError(
            f"model eos_id={model_cfg.eos_id} but {tokens_dir} ends documents with {dataset.eos_id}"
        )
    loader = TokenLoader(dataset, cfg.seq_len, cfg.micro_batch_size, cfg.seed, domain_weights=cfg.domain_weights)
    if resume_from is not None:
        loader.load_state_dict(state["loader"])
    batches = iter(loader)
    windows = {}
    if val_tokens_dir is not None:
        windows = eval_windows(TokenDataset(val_tokens_dir), cfg.seq_len, cfg.eval_windows_per_domain)
    accum = cfg.grad_accum_steps()
    forward = torch.compile(model) if cfg.compile else model
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device, bf16)

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer step ``step`` (1-based) over ``accum`` micro-batches; returns (loss, grad norm)."""
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(cfg, step - 1)
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y, _ = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = forward(x, y, doc_mask=cfg.doc_mask)
            (loss / accum).backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / accum, grad_norm

    start_step = step = state["step"]
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    t_start = t_mark = time.perf_counter()
    mark_step = start_step

    def record(step: int, **values: Any) -> dict[str, Any]:
        return {"step": step, "tokens": step * cfg.global_batch_tokens, **values}

    with open(metrics_path, "a") as log, tqdm(
        total=cfg.max_steps, initial=start_step, disable=not progress, unit="step", desc="train"
    ) as bar:

        def write(rec: dict[str, Any]) -> None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

        for step in range(start_step + 1, cfg.max_steps + 1):
            try:
                pending.append(train_step(step))
            except torch.cuda.OutOfMemoryError as e:
                raise TokenmillError(
                    f"CUDA out of memory at step {step} with micro_batch_size={cfg.micro_batch_size}, "
                    f"seq_len={cfg.seq_len}: lower micro_batch_size (gradient accumulation keeps "
                    f"global_batch_tokens) or seq_len"
                ) from e
            bar.update()
            last = step == cfg.max_steps
            do_eval = bool(windows) and (step % cfg.eval_every == 0 or last)
            do_ckpt = step % cfg.ckpt_every == 0 or last
            if not (step % cfg.log_every == 0 or do_eval or do_ckpt):
                continue

            losses, norms = (torch.stack(v).tolist() for v in zip(*pending))
            for i, (loss, norm) in enumerate(zip(losses, norms)):
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise TokenmillError(
                        f"loss {loss}, gradient norm {norm} at step {step - len(losses) + 1 + i}; last good "
                        f"checkpoint: {latest_checkpoint(ckpt_dir) or 'none saved yet'}. Lower lr or raise "
                        f"warmup_steps, then resume or restart."
                    )
            pending.clear()
            now = time.perf_counter()
            tokens_per_s = (step - mark_step) * cfg.global_batch_tokens / (now - t_mark)
            last_train = record(
                step,
                loss=sum(losses) / len(losses),
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=sum(norms) / len(norms),
                tokens_per_s=tokens_per_s,
                mfu=flops_per_token * tokens_per_s / peak if peak else None,
                elapsed_s=state["elapsed_s"] + now - t_start,
            )
            write(last_train)
            bar.set_postfix(loss=f"{last_train['loss']:.3f}", lr=f"{last_train['lr']:.2e}")
            if do_eval:
                last_val = record(step, **evaluate(model, windows, cfg, device, bf16))
                write(last_val)
            if do_ckpt:
                ckpt_state = {
                    "model_config": model_cfg.model_dump(mode="json"),
                    "train_config": cfg.model_dump(mode="json"),
                    "loader": loader.state_dict(),
                    "elapsed_s": state["elapsed_s"] + time.perf_counter() - t_start,
                }
                save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_state, cfg.keep_last_k)
            t_mark, mark_step = time.perf_counter(), step  # eval and checkpoint time is not throughput

    seconds = time.perf_counter() - t_start
    return {
        "steps": step,
        "tokens": step * cfg.global_batch_tokens,
        "final_loss": last_train.get("loss"),
        "final_val_loss": last_val.get("val_loss"),
        "seconds": seconds,
        "tokens_per_s": (step - start_step) * cfg.global_batch_tokens / seconds,
        "params": model.num_params(),
    }
