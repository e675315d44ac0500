"""What a user reads before writing a recipe: every step's parameters (``tokenmill steps``) and a
commented starter recipe for a data path (``tokenmill init``).

Both are rendered from the same Params classes and field descriptions the recipe validates against, so
neither can drift from what a recipe accepts.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import textwrap
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from tokenmill import TokenmillError
from tokenmill.documents.readers import detect_format, resolve_paths
from tokenmill.recipe import is_model
from tokenmill.steps import CURATION_STEPS, SELECTION_STEPS, STEPS

# ---- tokenmill steps: the steps' own Params classes, rendered -------------------------------------------
_WIDTH = 100
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"),
           ("max_length", "max length"))


def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "").replace("``", "`")


def steps_overview() -> str:
    """Every step a recipe can name, one line each: the first sentence of its class docstring."""
    out, width = [], max(map(len, STEPS)) + 4
    for kind, classes in (("curation", CURATION_STEPS), ("selection", SELECTION_STEPS)):
        out.append(f"{kind} steps:")
        for cls in classes:
            first = re.split(r"(?<=\.)\s", _doc(cls).split("\n\n")[0].replace("\n", " "))[0]
            out.append(textwrap.fill(first, _WIDTH, initial_indent=f"  {cls.name}".ljust(width),
                                     subsequent_indent=" " * width))
        out.append("")
    out.append("`tokenmill steps NAME` lists a step's parameters, types, defaults and descriptions.")
    return "\n".join(out)


def step_help(name: str) -> str:
    """One step's docstring and every parameter (nested settings as dotted names) with type, default,
    bounds and description, read off its Params class."""
    if name not in STEPS:
        close = difflib.get_close_matches(name, list(STEPS), n=1)
        raise TokenmillError(f"no step named {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                             + f" (steps: {', '.join(STEPS)})")
    cls = STEPS[name]
    kind = "curation" if cls in CURATION_STEPS else "selection"
    out = [f"{name} ({kind} step)", "", _doc(cls), "", f"parameters (in a recipe: `- step: {name}`, then any of):"]
    fields = [(f, info) for f, info in cls.Params.model_fields.items() if f != "step"]
    out += _param_lines(fields, "") if fields else ["  (none)"]
    return "\n".join(out)


def _param_lines(fields: list[tuple[str, FieldInfo]], prefix: str) -> list[str]:
    lines = []
    for field, info in fields:
        facts = [_type_name(info.annotation), "required" if info.is_required() else
                 f"default {_default(info)}"]
        facts += [f"{sym} {getattr(m, attr)}" for m in info.metadata for attr, sym in _BOUNDS if hasattr(m, attr)]
        lines.append(f"  {prefix}{field}: {', '.join(facts)}")
        if info.description:
            lines.append(textwrap.fill(info.description, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
        union = get_origin(info.annotation) in (Union, types.UnionType)
        nested = [a for a in (info.annotation, *(get_args(info.annotation) if union else ())) if is_model(a)]
        if nested:
            lines += _param_lines(list(nested[0].model_fields.items()), f"{prefix}{field}.")
    return lines


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    return "{...}" if isinstance(value, BaseModel) else json.dumps(to_jsonable_python(value), ensure_ascii=False)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# ---- tokenmill init: a starter recipe for a data path -----------------------------------------------------
_STARTER = """\
# A starter recipe written by `tokenmill init {data}`.
#   check it:  tokenmill validate {out}
#   run it:    tokenmill run {out} --out runs/{name}
#   every step and its parameters:  tokenmill steps [NAME]
name: {name_yaml}
sources:                      # paths relative to this file; a file, a folder (read recursively) or a glob
  - path: {path}
    # {files}: {formats} (format: auto picks each file's reader from its extension)
{source_fields}
heldout:                      # evaluation documents, held out per domain before anything else sees them
  fraction: 0.05
  max_docs_per_domain: 50
curate:
  steps:                      # run in order; `tokenmill inspect RUN` shows what each kept and removed
{extract}    - step: normalize           # Unicode and whitespace
    - step: length_filter
      min_words: 50
    - step: gopher_quality      # Gopher's quality rules (word lengths, symbols, stop words)
    - step: gopher_repetition   # repeated lines, paragraphs and n-grams
    - step: exact_dedup
    - step: minhash_dedup       # near-duplicates
tokenizer:
  vocab_size: 4096            # trained on the curated text; or path: a local Hugging Face tokenizer
model:                        # a small model to try the data on; preset: 124M (and up) for real runs
  dim: 128
  n_layers: 4
  n_heads: 4
  max_seq_len: 256
train:
  seq_len: 256
  micro_batch_size: 8
  global_batch_tokens: 4096   # 16 sequences per optimizer step
  max_steps: 500
  warmup_steps: 50
  lr: 3.0e-3
  eval_every: 100
  ckpt_every: 100
eval:
  batch_size: 8
"""


def starter_recipe(data_path: str, out: Path) -> str:
    """A commented recipe for ``data_path`` (file, folder or glob) to be written at ``out``: formats from
    the file names; for JSON Lines and Parquet the first file's fields decide text, id and domain."""
    files, skipped = _data_files(data_path)
    pattern = data_path
    if skipped:  # e.g. a README beside the data: read only files with the data's extension
        extensions = {_extension(f) for f in files}
        if len(extensions) != 1:
            raise TokenmillError(f"{skipped[0]}: cannot tell the format from the extension; point init at the "
                                 f"data files only (e.g. a glob such as 'data/*.jsonl')")
        pattern = os.path.join(data_path, f"**/*{extensions.pop()}")
    formats = sorted({detect_format(f, "auto") for f in files})
    fields = _first_record_fields(next(f for f in files if detect_format(f, "auto") == formats[0]), formats[0])
    base = Path(pattern)
    while any(c in base.name for c in "*?[") and base.name:
        base = base.parent
    name = re.sub(r"[^\w.-]+", "-", base.resolve().name.split(".")[0]) or "experiment"
    absolute = os.path.abspath(os.path.expanduser(pattern))
    rel = os.path.relpath(absolute, Path(out).resolve().parent)  # beside the recipe: relative, else absolute
    found = f"{len(files)} file{'s' if len(files) > 1 else ''}" + (
        f" (not {', '.join(f.name for f in skipped[:3])}{', ...' if len(skipped) > 3 else ''})" if skipped else "")
    return _STARTER.format(
        data=data_path, out=out, name=name, name_yaml=json.dumps(name), path=json.dumps(absolute if rel.startswith("..") else rel), formats=", ".join(formats), files=found,
        source_fields=_source_fields(fields),
        extract="    - step: extract             # HTML to main text\n" if {"html", "warc"} & set(formats) else "")


def _data_files(data_path: str) -> tuple[list[Path], list[Path]]:
    """The files of ``data_path`` a reader recognises by name, and the others."""
    files, skipped = [], []
    for f in resolve_paths(data_path):
        try:
            detect_format(f, "auto")
            files.append(f)
        except TokenmillError:
            skipped.append(f)
    if not files:
        raise TokenmillError(f"{data_path}: no file with a known data extension (.jsonl, .json, .ndjson, "
                             f"optionally .gz or .zst, .parquet, .txt, .html, .warc)")
    return files, skipped


def _extension(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix


def _first_record_fields(path: Path, fmt: str) -> dict[str, pa.DataType] | None:
    """Field names and types of a JSON Lines file's first record or a Parquet file's columns; None for
    formats without fields (txt, html, warc)."""
    if fmt == "parquet":
        schema = pq.read_schema(path)
        return dict(zip(schema.names, schema.types))
    if fmt != "jsonl":
        return None
    with pa.input_stream(str(path), compression="detect") as fh:  # .gz and .zst by extension
        head = b""
        while b"\n" not in head.lstrip() and (chunk := fh.read(1 << 16)):
            head += chunk
    try:
        record = json.loads(head.lstrip().split(b"\n", 1)[0])
    except ValueError:
        raise TokenmillError(f"{path}: the first line is not JSON; is it JSON Lines?") from None
    if not isinstance(record, dict):
        raise TokenmillError(f"{path}: the first line is not a JSON object; is it JSON Lines?")
    return {k: pa.string() if isinstance(v, str) else pa.null() for k, v in record.items()}


def _source_fields(fields: dict[str, pa.DataType] | None) -> str:
    """The source's text/id/domain settings as commented YAML lines, chosen from the record's fields."""
    if fields is None:
        return "    # one document per file (txt, html) or per HTML response (warc); the domain is the file name"
    lines = []
    if "text" not in fields:
        texts = [k for k, t in fields.items() if pa.types.is_string(t) or pa.types.is_large_string(t)]
        lines.append(f"    text_field: {texts[0]}   # guessed: the first text field; the records have no `text`"
                     if texts else "    text_field: text   # fix: no field of the first record holds text")
    if "id" not in fields:
        lines.append("    # no `id` field: a document's id is <file>:<line> (set id_field: to name one)")
    lines.append("    domain_field: domain   # each record's `domain` is its domain" if "domain" in fields else
                 "    # no `domain` field: each file is a domain, named after it (or set domain: for one label)")
    return "\n".join(lines)
