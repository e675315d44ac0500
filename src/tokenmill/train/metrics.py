"""Where training metrics go: ``metrics.jsonl`` always (the report reads it), TensorBoard and Weights &
Biases when the config asks. Both are optional packages, imported only when enabled and checked
before the first step, so a missing one fails the run at once with what to install."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
