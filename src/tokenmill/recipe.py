"""The recipe: one YAML file describing a whole experiment, validated before anything runs.

The schema is composed from each stage's own config model, so a field is documented once, where it
is used. ``load_recipe`` applies ``--set a.b=c`` overrides and reports *every* error at once, each
with its field path and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenmill import TokenmillError
from tokenmill.documents.ingest import HeldoutConfig
from tokenmill.documents.readers import SourceConfig
from tokenmill.model.llama import ModelConfig
from tokenmill.steps import STEPS
from tokenmill.tokens.tokenizer import TokenizerConfig
from tokenmill.train.config import TrainConfig

StepConfig = Annotated[Union[tuple(cls.Params for cls in STEPS.values())], Field(discriminator="step")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurateConfig(_Strict):
    executor: Literal["local", "ray"] = Field("local", description="Where shard tasks run: a local process "
                                              "pool, or a Ray cluster (pip install 'tokenmill[ray]').")
    ray_address: str | None = Field(None, description="Ray cluster to attach to ('auto', 'ray://host:10001'); "
                                                      "unset starts a local cluster. Shards must be on storage "
                                                      "every node sees.")
    workers: int | None = Field(None, ge=1, description="Worker processes (local) or CPUs of a started local "
                                                        "Ray cluster (default: all usable cores).")
    shard_docs: int = Field(2000, ge=1, description="Documents per Parquet shard (the unit of parallelism "
                                                   "and of resume).")
    shard_bytes: int = Field(64 << 20, ge=1 << 10, description="Upper bound on a shard's text size in bytes.")
    keep_rejected: bool = Field(True, description="Keep removed documents under <step>/rejected/ for "
                                                  "inspection (counts are always kept).")
    steps: list[StepConfig] = Field(default_factory=list, description="Curation steps, run in order. "
                                    f"Available: {', '.join(sorted(STEPS))}.")


class EvalConfig(_Strict):
    bpb: bool = Field(True, description="Bits-per-byte per domain on the held-out documents.")
    max_docs_per_domain: int | None = Field(None, ge=1, description="Cap on documents evaluated per domain.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during evaluation.")


class Recipe(_Strict):
    name: str = Field(description="A short name for the experiment (used in reports).")
    sources: list[SourceConfig] = Field(min_length=1, description="Where the documents come from.")
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _tokenizer_of_init_checkpoint(self) -> "Recipe":
        """Continued pretraining keeps the checkpoint's tokenizer unless another one is named."""
        if self.model.init_from and not self.tokenizer.path:
            self.tokenizer.path = self.model.init_from
        return self

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> "Recipe":
        """Training windows longer than the positions the model covers would fail only after packing."""
        if not self.model.init_from and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} is longer than model.max_seq_len="
                             f"{self.model.max_seq_len}: lower seq_len or raise max_seq_len")
        return self


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating dicts on the way."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise TokenmillError(f"--set {dotted}: {key!r} is not an index of a list of {len(node)}")
            key = int(key)
            if last:
                node[key] = value
            else:
                node = node[key]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise TokenmillError(f"--set {dotted}: {'.'.join(keys[:i])} is not a mapping or a list")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise TokenmillError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=200")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise TokenmillError(f"--set {item!r}: the value is not valid YAML ({err.problem or err}); quote "
                                 f"it or fix the brackets, e.g. --set 'train.betas=[0.9, 0.95]'") from None
        _set_path(data, key.strip(), value)
    return data


def format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} error(s) in the recipe"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {path}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise TokenmillError(f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise TokenmillError(format_errors(err, origin)) from None


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise TokenmillError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TokenmillError(f"{path}: not valid YAML: {err}") from None


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Relative paths (sources, tokenizer, init checkpoint) are
    made absolute from the recipe's folder, so the resolved recipe in the run folder works from anywhere."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        return parse_recipe(data, str(path))
    data = apply_overrides(data, overrides or [])
    for src in data.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = _absolute(src["path"], path.parent)
    for section, key in (("tokenizer", "path"), ("model", "init_from")):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = _absolute(part[key], path.parent)
    curate = data.get("curate")
    if isinstance(curate, dict) and isinstance(curate.get("steps"), list):
        _absolute_step_paths(curate["steps"], path.parent)
    return parse_recipe(data, str(path))


def _absolute_step_paths(node: Any, base: Path) -> None:
    """Inside step params, keys named ``path``, ``*_path`` or ``*_paths`` are file paths."""
    if isinstance(node, list):
        for item in node:
            _absolute_step_paths(item, base)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "path" or key.endswith("_path"):
                if isinstance(value, str):
                    node[key] = _absolute(value, base)
            elif key.endswith("_paths") and isinstance(value, list):
                node[key] = [_absolute(v, base) if isinstance(v, str) else v for v in value]
            else:
                _absolute_step_paths(value, base)


def _absolute(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str((base / p).resolve())


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
