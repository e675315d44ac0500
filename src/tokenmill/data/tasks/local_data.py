"""The bundled tasks' ``custom_dataset``: lm_eval reads a YAML's ``data_files`` relative to the working
directory, so the tasks load their data through this module, which resolves them against this folder
instead and makes ``lm_eval --include_path <this folder>`` work from anywhere."""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def json_here(data_files: dict[str, str], **metadata) -> datasets.DatasetDict:
    """The JSON Lines ``data_files`` ({split: file in this folder}); lm_eval also passes the task's
    ``metadata`` (and ``--metadata``), which a local file has no use for."""
    return datasets.load_dataset("json", data_files={split: str(HERE / name) for split, name in data_files.items()})
