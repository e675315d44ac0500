"""Where a run's starting weights come from, beside a fresh initialisation: a smaller trained model to
grow from (``model.grow_from``), which is a Hugging Face folder or a tokenmill run folder."""

from __future__ import annotations

from pathlib import Path

from tokenmill import TokenmillError
from tokenmill.model.growth import stack
from tokenmill.model.hf import import_hf
from tokenmill.model.llama import Llama
from tokenmill.runfolder import RunFolder
from tokenmill.train.checkpoint import load_trained_model


def source_folders(path: str | Path) -> tuple[Path, Path]:
    """(weights, tokenizer folder) of ``grow_from``: a Hugging Face folder is both; a tokenmill run
    folder gives its ``model/`` export, else its ``train/checkpoints``, and its ``tokens/tokenizer``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, path
    run = RunFolder(path)
    for weights in (run.model, run.checkpoints):
        if weights.is_dir():
            return weights, run.tokenizer
    raise TokenmillError(f"model.grow_from={path}: neither a Hugging Face model folder (config.json) nor a "
                         f"trained tokenmill run folder ({run.model} or {run.checkpoints})")


def load_source(path: str | Path) -> Llama:
    """The model ``grow_from`` names (see ``source_folders``)."""
    weights, _ = source_folders(path)
    if weights.name == "checkpoints":
        return load_trained_model(weights)[0]
    return import_hf(weights)[0]


def grow(model: Llama) -> None:
    """Start ``model`` from its config's ``grow_from``, stacked ``grow.depth`` times."""
    stack(model, load_source(model.cfg.grow_from), model.cfg.grow.depth)
