"""Atomic, resumable checkpoints: ``checkpoints/step-N/`` appears whole or not at all.

Everything is written into ``step-N.tmp/``, flushed to disk, then renamed with ``os.replace``; a crash
leaves at most a ``.tmp`` folder, which ``latest_checkpoint`` never returns and the next save removes.
A folder holds the model (safetensors), the optimizer state, the RNG states and ``state.json`` (step,
configs, loader position), which is all a run needs to continue bit-identically.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama, ModelConfig

STEP_DIR = re.compile(r"step-(\d+)")


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for f in root.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = checkpoints(Path(ckpt_dir))
    return found[-1][1] if found else None


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last_k: int,
) -> Path:
    """Write ``ckpt_dir/step-{step}`` atomically, then delete all but the ``keep_last_k`` newest.
    ``state`` is JSON metadata (configs, loader position, counters) returned by ``load_checkpoint``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. a rerun of the last one): swap the old copy out
        shutil.rmtree(final)
    os.replace(tmp, final)

    for old in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(old, ignore_errors=True)
    for _, old in checkpoints(ckpt_dir)[:-keep_last_k]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and optimizer and RNG states when an optimizer is given); return ``state``."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def load_trained_model(ckpt_dir: Path) -> tuple[Llama, ModelConfig]:
    """The model of the newest checkpoint in ``ckpt_dir``, on CPU in eval mode, with its config."""
    path = latest_checkpoint(Path(ckpt_dir))
    if path is None:
        raise TokenmillError(f"no checkpoint in {ckpt_dir}: train the model first")
    state = json.loads((path / "state.json").read_text())
    cfg = ModelConfig.model_validate(state["model_config"])
    model = Llama(cfg)
    load_model(model, str(path / "model.safetensors"))
    return model.eval(), cfg
