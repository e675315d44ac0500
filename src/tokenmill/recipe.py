"""The recipe: one YAML file describing a whole experiment, validated before anything runs.

The schema is composed from each stage's own config model, so a field is documented once, where it
is used. ``load_recipe`` applies ``--set a.b=c`` overrides and reports *every* error at once, each
with its field path, what is allowed and, for a misspelt name, the nearest valid one. With
``preflight`` it also reports what would fail only once running: sources that match no file, a
warm-up as long as training, options whose optional package is not installed.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from tokenmill import TokenmillError
from tokenmill.documents.ingest import HeldoutConfig
from tokenmill.documents.readers import SourceConfig, resolve_paths
from tokenmill.model.llama import ModelConfig
from tokenmill.select.mixture_search import MixSearchConfig
from tokenmill.steps import STEPS
from tokenmill.tokens.corruption import corruption_shapes
from tokenmill.tokens.pack import INDEX_COLUMNS, PackConfig
from tokenmill.tokens.tokenizer import TokenizerConfig
from tokenmill.train.config import TrainConfig
from tokenmill.train.sources import source_folders

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
                                    f"Available: {', '.join(sorted(STEPS))} "
                                    "(`tokenmill steps NAME` lists one's parameters).")


class EvalConfig(_Strict):
    bpb: bool = Field(True, description="The eval stage: bits per byte per domain on the held-out documents "
                      "(decoders), or the objective's own figures and a linear probe (encoders).")
    max_docs_per_domain: int | None = Field(None, ge=1, description="Cap on documents evaluated per domain.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during evaluation.")


class Recipe(_Strict):
    name: str = Field(description="A short name for the experiment (used in reports).")
    sources: list[SourceConfig] = Field(min_length=1, description="Where the documents come from.")
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mix_search: MixSearchConfig | None = Field(None, description="How `tokenmill mix search` looks for this "
                                               "recipe's train.domain_weights with small proxy models (null: "
                                               "its defaults); a run ignores it.")

    @model_validator(mode="after")
    def _tokenizer_of_init_checkpoint(self) -> "Recipe":
        """Continued pretraining, and growth from a smaller model, keep that model's tokenizer unless
        another one is named."""
        if self.model.init_from and not self.tokenizer.path:
            self.tokenizer.path = self.model.init_from
        if self.model.grow_from and not self.tokenizer.path:
            try:
                self.tokenizer.path = str(source_folders(self.model.grow_from)[1])
            except TokenmillError as err:
                raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _sltrain_fits_the_model(self) -> "Recipe":
        """SLTrain's rank and density must fit the smallest block matrix (k/v, n_kv_heads·head_dim × dim),
        and it trains from scratch: a starting checkpoint's weights would be thrown away."""
        opt, m = self.train.optimizer, self.model
        if opt.name != "sltrain":
            return self
        if m.init_from or m.grow_from:
            raise ValueError("train.optimizer sltrain trains its low-rank and sparse factors from scratch; it "
                             "cannot start from model.init_from or model.grow_from")
        rows, cols = m.n_kv_heads * m.head_dim, m.dim
        smallest = min(rows, cols, m.ffn_hidden)
        if opt.rank > smallest:
            raise ValueError(f"train.optimizer.rank={opt.rank} is larger than the smallest block matrix allows "
                             f"({rows}×{cols} k/v projections, ffn_hidden {m.ffn_hidden}): at most {smallest}")
        if round(opt.density * rows * cols) < 1:
            raise ValueError(f"train.optimizer.density={opt.density} leaves no sparse entry in the {rows}×{cols} "
                             f"k/v projections: raise it")
        return self

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> "Recipe":
        """Training windows longer than the positions the model covers would fail only after packing."""
        if not self.model.init_from and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} is longer than model.max_seq_len="
                             f"{self.model.max_seq_len}: lower seq_len or raise max_seq_len")
        return self

    @model_validator(mode="after")
    def _objective_fits_the_run(self) -> "Recipe":
        """Document masking and MeCo's metadata prefixes are the causal decoder's; span corruption's spans,
        prefixes and targets must fit train.seq_len and model.max_seq_len."""
        objective = self.model.objective
        if objective == "clm":
            return self
        for field, value in (("doc_mask", self.train.doc_mask), ("metadata", self.train.metadata),
                             ("bpb_every", self.train.bpb_every)):
            if value:
                raise ValueError(f"train.{field} applies to the causal decoder (model.objective clm), not to "
                                 f"model.objective {objective}; unset train.{field} or train with clm")
        if self.train.optimizer.name == "sltrain":
            raise ValueError(f"train.optimizer sltrain reparametrises the decoder's blocks; model.objective "
                             f"{objective} trains with adamw, muon or galore")
        try:
            corruption_shapes(objective, self.model, self.train.seq_len)
        except TokenmillError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _mixture_names_known_streams(self) -> "Recipe":
        """Mixture weights may only name streams the run will have: the sources' domains when every source
        names its own, or the cluster step's clusters when streams are clusters."""
        named = set(self.train.domain_weights or {}) | (self.train.mixture.domains() if self.train.mixture else set())
        known: set[str] | None = None
        if self.pack.domain_field == "domain" and all(src.domain for src in self.sources):
            known = {src.domain for src in self.sources}
        elif self.pack.domain_field == "cluster":
            clusters = [cfg for cfg in self.curate.steps if cfg.step == "cluster"]
            if not clusters:
                raise ValueError("pack.domain_field: cluster needs a cluster step in curate.steps")
            width = len(str(clusters[-1].n_clusters - 1))
            known = {f"cluster-{i:0{width}d}" for i in range(clusters[-1].n_clusters)}
        unknown = sorted(named - known) if known is not None else []
        if unknown:
            raise ValueError(f"the train mixture names {unknown}, which the run will not have; its "
                             f"{self.pack.domain_field} streams are {sorted(known)}")
        return self

    @model_validator(mode="after")
    def _metadata_field_in_the_token_index(self) -> "Recipe":
        """MeCo reads each document's metadata from the token index, so packing must keep the field."""
        field = self.train.metadata.field if self.train.metadata else None
        if field and field not in INDEX_COLUMNS and field not in self.pack.index_fields:
            self.pack.index_fields.append(field)
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


def format_errors(errors: list[dict], origin: str) -> str:
    """One line per error (pydantic's, or a preflight check's without ``input``), with its field path."""
    lines = [f"{origin}: {len(errors)} error(s) in the recipe"]
    for e in errors:
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = "" if "input" not in e or isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {path}: {e['msg']}{shown}{_did_you_mean(e)}")
    return "\n".join(lines)


def _did_you_mean(error: dict) -> str:
    """The nearest valid name for a misspelt step (a tag of a tagged union) or field (an extra input)."""
    if error.get("type") == "union_tag_invalid":
        word, names = str(error["ctx"]["tag"]), re.findall(r"'([^']*)'", error["ctx"]["expected_tags"])
    elif error.get("type") == "extra_forbidden":
        model = _model_at(error["loc"][:-1])
        word, names = str(error["loc"][-1]), list(model.model_fields) if model else []
    else:
        return ""
    close = difflib.get_close_matches(word, names, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose fields sit at ``loc`` of a recipe, stepping through list indices and step tags."""
    tp: Any = Recipe
    for key in loc:
        tp = _child(tp, key)
    while get_origin(tp) in (Annotated, Union, types.UnionType):  # an optional section: its model
        tp = next((a for a in get_args(tp) if is_model(a) or get_origin(a)), None)
    return tp if is_model(tp) else None


def _child(tp: Any, key: str | int, discriminator: str | None = None) -> Any:
    """The type found at ``key`` inside ``tp`` (None when the path leaves the schema)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        tags = [m.discriminator for m in args[1:] if isinstance(m, FieldInfo) and m.discriminator]
        return _child(args[0], key, tags[0] if tags else None)
    if origin in (Union, types.UnionType):
        if discriminator:
            return next((a for a in args if is_model(a) and key in get_args(a.model_fields[discriminator].annotation)),
                        None)
        return next((c for c in (_child(a, key) for a in args) if c is not None), None)
    if origin is list and isinstance(key, int):
        return args[0]
    if origin is dict and isinstance(key, str):
        return args[1]
    if is_model(tp) and key in tp.model_fields:
        return tp.model_fields[key].annotation
    return None


def preflight_errors(data: dict) -> list[dict]:
    """What the schema allows but a run would trip over later: a source matching no file (paths are
    expanded, no file is read), a warm-up that lasts the whole run, an option whose optional package
    is missing (looked up, never imported). Each section is checked only where it is itself valid, so
    these errors come beside the schema's, not instead of them."""
    errors = []
    for i, src in enumerate(data.get("sources") if isinstance(data.get("sources"), list) else []):
        try:
            resolve_paths(SourceConfig.model_validate(src).path)
        except ValidationError:
            pass
        except TokenmillError as err:
            errors.append({"loc": ("sources", i, "path"), "msg": str(err)})
    try:
        train = TrainConfig.model_validate(data.get("train") or {})
    except (ValidationError, TokenmillError):
        train = None
    if train and train.warmup_steps >= train.max_steps:
        errors.append({"loc": ("train", "warmup_steps"),
                       "msg": f"{train.warmup_steps} is not below train.max_steps ({train.max_steps}): the warm-up "
                              f"would take the whole run; lower warmup_steps or raise max_steps"})
    curate = data.get("curate") if isinstance(data.get("curate"), dict) else {}
    for loc, wanted, package, install in (
            (("train", "tensorboard"), train and train.tensorboard, "tensorboard", "pip install tensorboard"),
            (("train", "wandb"), train and train.wandb, "wandb", "pip install wandb"),
            (("curate", "executor"), curate.get("executor") == "ray", "ray", "pip install 'tokenmill[ray]'")):
        if wanted and importlib.util.find_spec(package) is None:
            errors.append({"loc": loc, "msg": f"needs the {package} package, which is not installed: {install}, "
                                              f"or turn this option off"})
    return errors


def parse_recipe(data: Any, origin: str = "recipe", *, preflight: bool = False) -> Recipe:
    if not isinstance(data, dict):
        raise TokenmillError(f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}")
    errors = preflight_errors(data) if preflight else []
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise TokenmillError(format_errors(err.errors() + errors, origin)) from None
    if errors:
        raise TokenmillError(format_errors(errors, origin))
    return recipe


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise TokenmillError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TokenmillError(f"{path}: not valid YAML: {err}") from None


def load_recipe(path: Path, overrides: list[str] | None = None, *, preflight: bool = False) -> Recipe:
    """Read, override and validate a recipe. Relative paths (sources, tokenizer, init checkpoint) are
    made absolute from the recipe's folder, so the resolved recipe in the run folder works from anywhere.
    ``preflight`` (the CLI's run and validate) adds ``preflight_errors``; off for a run folder's own
    recipe, whose sources may be gone once read."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        return parse_recipe(data, str(path))
    data = apply_overrides(data, overrides or [])
    for src in data.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = _absolute(src["path"], path.parent)
    for section, key in (("tokenizer", "path"), ("model", "init_from"), ("model", "grow_from")):
        part = data.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = _absolute(part[key], path.parent)
    curate = data.get("curate")
    if isinstance(curate, dict) and isinstance(curate.get("steps"), list):
        _absolute_step_paths(curate["steps"], path.parent)
    mixture = (data.get("train") or {}).get("mixture") if isinstance(data.get("train"), dict) else None
    if isinstance(mixture, dict):
        for section, key in (("doremi", "reference"), (None, "searched")):
            part = mixture.get(section) if section else mixture
            if isinstance(part, dict) and isinstance(part.get(key), str):
                part[key] = _absolute(part[key], path.parent)
    return parse_recipe(data, str(path), preflight=preflight)


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
