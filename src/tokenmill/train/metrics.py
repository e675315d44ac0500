"""Where training metrics go: ``metrics.jsonl`` always (the report reads it), TensorBoard and Weights &
Biases when the config asks, and a line on the console. Both trackers are optional packages, imported
only when enabled and checked before the first step, so a missing one fails the run at once with what
to install. A record becomes its console line here only (``console_line``), printed by ``say``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.train.config import TrainConfig


def truncate_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Rewrite ``path`` keeping only records up to the checkpoint being resumed, so a resumed run
    appends without duplicates; a line torn by a crash is dropped. Returns the kept records."""
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


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TokenmillError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard, or set it false"
        ) from err
    return SummaryWriter(str(log_dir))


def _wandb(cfg, out_dir: Path, run_config: dict[str, Any]):
    try:
        import wandb
    except ImportError as err:
        raise TokenmillError("train.wandb needs the wandb package: pip install wandb, or remove train.wandb") from err
    id_file = out_dir / "wandb_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.project, mode=cfg.mode, dir=str(out_dir), id=run_id, resume="allow",
                      config=run_config)


class MetricsSink:
    """Appends records to ``out_dir/metrics.jsonl`` (after dropping those past ``resume_step``) and
    mirrors their numeric values to the enabled trackers, keyed by step."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, resume_step: int, run_config: dict[str, Any]):
        out_dir = Path(out_dir)
        self.history = truncate_metrics(out_dir / "metrics.jsonl", resume_step)
        self._tensorboard = _tensorboard(out_dir / "tensorboard") if cfg.tensorboard else None
        self._wandb = _wandb(cfg.wandb, out_dir, run_config) if cfg.wandb else None
        self._log = open(out_dir / "metrics.jsonl", "a")

    def write(self, record: dict[str, Any]) -> None:
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self._log.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def say(line: str) -> None:
    """Print to stdout through tqdm, so an open progress bar is redrawn below the line instead of broken,
    and flush, so CI, Slurm and Ray logs show it at once."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def console_line(record: dict[str, Any], max_steps: int, *, eta_s: float | None = None,
                 seconds: float | None = None) -> str:
    """One metrics record as a console line: training (loss, gradient norm, lr, throughput, MFU when
    known, ETA), validation loss or bits per byte, each overall then per domain, and the seconds the
    evaluation took."""
    parts = [f"step {record['step']}/{max_steps}"]
    if "loss" in record:
        parts += [f"loss {record['loss']:.4f}", f"gnorm {record['grad_norm']:.3f}", f"lr {record['lr']:.2e}",
                  f"{_count(record['tokens_per_s'])} tok/s"]
        if record["mfu"] is not None:
            parts.append(f"mfu {record['mfu']:.1%}")
    for key in ("val_loss", "bpb"):
        if key in record:
            domains = " ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in record.items() if k.startswith(key + "/"))
            parts.append(f"{key} {record[key]:.4f}" + (f" ({domains})" if domains else ""))
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    if seconds is not None:
        parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


def _count(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"
