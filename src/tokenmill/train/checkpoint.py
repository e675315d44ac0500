"""Atomic, resumable checkpoints: ``checkpoints/step-N/`` appears whole or not at all.

Everything is written into ``step-N.tmp/``, flushed to disk, then renamed with ``os.replace``; a crash
leaves at most a ``.tmp`` folder, which ``latest_checkpoint`` never returns and the next save removes.
A folder holds the model and optimizer state (torch.distributed.checkpoint), each rank's RNG states
and ``state.json`` (step, configs, loader position), which is all a run needs to continue
bit-identically.

Loading never runs code from the folder, which may have been copied from anywhere: RNG states are
tensors and plain values read with ``weights_only=True``, and the pickles DCP itself reads unguarded
(``.metadata``, and the optimizer's non-tensor values) are checked against an allowlist first.

One format for every world size: model and optimizer state are saved by parameter name, each rank
writing its own shards, and loading reshards to whatever layout the loading model has. A run trained
on 2 GPUs with FSDP2 resumes on 1 (or 8), and ``load_trained_model`` reads it in a plain process.
Under ``torchrun`` every rank calls the save and load functions; the folder must be on storage that
all ranks see.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, Metadata
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tokenmill import TokenmillError
from tokenmill.model.build import build_model
from tokenmill.model.llama import ModelConfig
from tokenmill.train.config import TrainConfig
from tokenmill.train.sltrain import apply_sltrain

STEP_DIR = re.compile(r"step-(\d+)")


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, which ``weights_only`` loading accepts."""
    version, python_state, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
        "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                           "pos": numpy_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_key = state["numpy"]["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**state["numpy"], "state": {**state["numpy"]["state"], "key": numpy_key}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a plain pickle of its own dataclasses: allow those, dtypes and the few
    other types they hold, nothing that could run code."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        found = getattr({"torch": torch, dcp_metadata.__name__: dcp_metadata}.get(module), name, None)
        if isinstance(found, torch.dtype) or (isinstance(found, type) and found.__module__ == dcp_metadata.__name__):
            return found
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


class _CheckedPlanner(DefaultLoadPlanner):
    """DCP loads non-tensor values (optimizer hyperparameters) with ``weights_only=False``: load each
    with ``weights_only=True`` first, which refuses any pickled code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dcp(op, sharded: dict[str, Any], path: Path, **kwargs: Any) -> None:
    """``dcp.save`` or ``dcp.load``, in a process group or alone; alone, DCP warns on every call about
    what is, here, the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        op(sharded, checkpoint_id=path, no_dist=not dist.is_initialized(), **kwargs)


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
    ``state`` is JSON metadata (configs, loader position, counters) returned by ``load_checkpoint``.
    Rank 0 prepares, publishes and prunes the folder; every rank writes its shards and RNG states."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    main = _rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    sharded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    _dcp(dcp.save, sharded, tmp)
    torch.save(_rng_state(), tmp / f"rng-{_rank()}.pt")
    _barrier()
    if main:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. a rerun of the last one): swap the old copy out
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(ckpt_dir, keep_last_k)
    _barrier()
    return final


def prune_checkpoints(ckpt_dir: Path, keep_last_k: int) -> None:
    """Delete unfinished ``.tmp`` folders and all but the ``keep_last_k`` newest checkpoints. A resumed
    run calls it too, for a run killed between publishing a checkpoint and pruning."""
    for old in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(old, ignore_errors=True)
    for _, old in checkpoints(ckpt_dir)[:-keep_last_k]:
        shutil.rmtree(old)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and optimizer and RNG states when an optimizer is given), resharded to the
    model's current layout; return ``state``."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise TokenmillError(f"{path} is not a complete tokenmill checkpoint (no .metadata): delete it and resume")
    with open(path / ".metadata", "rb") as fh:
        try:  # checked here, as DCP unpickles it unguarded
            metadata = _MetadataUnpickler(fh).load()
        except pickle.UnpicklingError as err:
            raise _untrusted(path / ".metadata", err) from err
    if not isinstance(metadata, Metadata):  # DCP would then fall back to per-rank metadata files, unchecked
        raise TokenmillError(f"{path / '.metadata'} is not torch.distributed.checkpoint metadata: delete {path}")
    sharded = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sharded["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        _dcp(dcp.load, sharded, path, planner=_CheckedPlanner())
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, pickle.UnpicklingError)]
        if refused:
            raise _untrusted(path, refused[0]) from err
        raise
    set_model_state_dict(model, sharded["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sharded["optim"])
        rng = path / f"rng-{_rank()}.pt"
        if rng.is_file():  # a rank the saving run did not have starts from its seeded state
            try:
                _set_rng_state(torch.load(rng, weights_only=True))
            except pickle.UnpicklingError as err:
                raise _untrusted(rng, err, remedy=f"delete {rng.name} to resume from the seeded RNG "
                                                  "state instead") from err
    return json.loads((path / "state.json").read_text())


def _untrusted(path: Path, err: Exception, remedy: str = "") -> TokenmillError:
    """Refusing a pickle that names code: a tampered checkpoint, or one from another program (or from
    an older tokenmill, whose RNG files held pickled numpy arrays)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
    return TokenmillError(
        f"refusing to load {path}: it holds pickled objects other than tensors and plain values, which could "
        f"run code ({reason}); resume only from checkpoints your own runs wrote" + (f", or {remedy}" if remedy else "")
    )


def load_trained_model(ckpt_dir: Path, step: int | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model of the checkpoint at ``step`` (default: the newest) in ``ckpt_dir``, on CPU in eval mode,
    with its config."""
    found = dict(checkpoints(Path(ckpt_dir)))
    if not found:
        raise TokenmillError(f"no checkpoint in {ckpt_dir}: train the model first")
    if step is not None and step not in found:
        raise TokenmillError(f"no checkpoint of step {step} in {ckpt_dir}; kept: "
                             f"{', '.join(map(str, sorted(found)))} (train.keep_last_k sets how many are kept)")
    path = found[max(found) if step is None else step]
    state = json.loads((path / "state.json").read_text())
    cfg = ModelConfig.model_validate(state["model_config"])
    model = build_model(cfg)
    train_cfg = TrainConfig.model_validate(state["train_config"])
    if train_cfg.optimizer.name == "sltrain":  # its weights are low-rank + sparse factors: rebuild them first
        apply_sltrain(model, train_cfg.optimizer, cfg, train_cfg.seed)
    load_checkpoint(path, model)
    return model.eval(), cfg
