"""Checkpoints are data, never code: resuming from a folder copied from elsewhere cannot run anything.

Each test plants a pickle whose ``__reduce__`` runs a shell command in one of the files a resume reads,
and checks that loading refuses it by name and that the command never ran.
"""

from __future__ import annotations

import os
import pickle
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill import TokenmillError
from tokenmill.model import Llama, ModelConfig
from tokenmill.train.checkpoint import load_checkpoint, save_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.optim import build_adamw

SEQ, VOCAB = 16, 64


class Planted:
    """Unpickling it runs ``touch MARKER``: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def model_and_optimizer() -> tuple[Llama, torch.optim.Optimizer]:
    model = Llama(ModelConfig(preset="tiny", vocab_size=VOCAB, eos_id=0, max_seq_len=SEQ))
    cfg = TrainConfig(seq_len=SEQ, micro_batch_size=2, global_batch_tokens=2 * SEQ, device="cpu")
    return model, build_adamw(model, cfg, torch.device("cpu"))


def trained() -> tuple[Llama, torch.optim.Optimizer]:
    """After one step, so the optimizer has state to save."""
    model, optimizer = model_and_optimizer()
    model(torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ)))[1].backward()
    optimizer.step()
    return model, optimizer


def save(ckpt_dir: Path, model: Llama, optimizer: torch.optim.Optimizer) -> Path:
    return save_checkpoint(ckpt_dir, 1, model, optimizer, {"note": "x"}, keep_last_k=1)


def test_rng_states_are_tensors_and_plain_values_and_restore(tmp_path):
    path = save(tmp_path, *trained())
    torch.load(path / "rng-0.pt", weights_only=True)  # no pickled numpy arrays or other globals
    expected = (random.random(), np.random.rand(), torch.rand(1))
    load_checkpoint(path, *model_and_optimizer())
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("where", ["rng", "metadata", "optimizer"])
def test_resume_refuses_a_planted_pickle_without_running_it(tmp_path, where):
    marker = tmp_path / "marker"
    model, optimizer = trained()
    if where == "optimizer":  # a non-tensor optimizer value, which DCP unpickles on its own
        optimizer.param_groups[0]["lr"] = Planted(marker)
    path = save(tmp_path / "checkpoints", model, optimizer)
    planted = {"rng": path / "rng-0.pt", "metadata": path / ".metadata", "optimizer": path}[where]
    if where == "rng":
        torch.save({"python": Planted(marker)}, planted)
    if where == "metadata":
        planted.write_bytes(pickle.dumps(Planted(marker)))
    assert not marker.exists()
    with pytest.raises(TokenmillError, match=rf"refusing to load {planted}: .*could run code \(.*system"):
        load_checkpoint(path, *model_and_optimizer())
    assert not marker.exists()
