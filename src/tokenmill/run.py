"""Run a recipe end to end into a run folder, stage by stage, redoing only what is missing or stale.

Every stage writes its outputs atomically and is recognised as complete by a file it writes last, so
``tokenmill run`` after a crash or Ctrl-C picks up where it stopped: curation per shard, packing per
shard, training from the last checkpoint. ``timings.json`` records each stage's wall time.

Like a build system, each stage (and each curation step) is fingerprinted by the recipe fields it reads
and by its upstream stages' fingerprints (``stages.json``). A rerun with a changed recipe removes and
redoes only the stages whose fingerprint changed, and says why; raising ``train.max_steps`` continues
training from the last checkpoint, and settings that only change how training is watched or how fast
it runs (``TRAIN_CADENCE``) keep its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
from pydantic import BaseModel

from tokenmill import TokenmillError
from tokenmill.curate.pipeline import run_pipeline
from tokenmill.documents.ingest import ingest
from tokenmill.documents.readers import resolve_paths
from tokenmill.documents.shards import list_shards, write_parquet_atomic
from tokenmill.executors import LocalExecutor
from tokenmill.files import read_json, write_json_atomic
from tokenmill.recipe import Recipe, dump_recipe
from tokenmill.runfolder import RunFolder, StageRecord
from tokenmill.steps import STEPS
from tokenmill.tokens.corruption import required_tokens
from tokenmill.tokens.pack import PackConfig


# Training settings that change how a run is watched, checkpointed or how fast it goes, not what it
# learns: changing them keeps the checkpoints (max_steps continues training, or refuses to shorten it).
TRAIN_CADENCE = ("max_steps", "log_every", "eval_every", "eval_windows_per_domain", "ckpt_every", "keep_last_k",
                 "bpb_every", "bpb_docs_per_domain", "tensorboard", "wandb", "compile", "activation_checkpointing",
                 "selective_ac", "device")


def _fingerprint(upstream: str, inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([upstream, inputs], sort_keys=True).encode()).hexdigest()[:16]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and (node or not prefix):  # a stage that reads no field has none to list
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _non_default(name: str, section: dict[str, Any], default: BaseModel) -> dict[str, Any]:
    """A recipe section's fields that differ from ``default``'s, as ``name.field`` stage inputs: a run folder
    made before the section existed keeps its fingerprint while the section stays at its defaults."""
    defaults = default.model_dump(mode="json")
    return {f"{name}.{key}": value for key, value in section.items() if value != defaults[key]}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The recipe fields that differ between two stage inputs, as ``path old -> new``."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key} {_short(before.get(key))} -> {_short(after.get(key))}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class Runner:
    def __init__(self, recipe: Recipe, out: Path, *, progress: bool = True, overwrite: bool = False):
        self.recipe = recipe
        self.folder = RunFolder(out)
        self.progress = progress
        self.overwrite = overwrite

    def _open(self) -> None:
        """Claim the folder (called with its lock held): empty it with ``--overwrite``, check it is a run
        folder of this layout, remove what the recipe's changes made stale, and write the recipe."""
        f, text = self.folder, dump_recipe(self.recipe)
        if self.overwrite and f.root.is_dir():
            for child in f.root.iterdir():
                if child != f.lock_file:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if f.recipe.exists():
            f.require()
            same_recipe = f.recipe.read_text(encoding="utf-8") == text
        else:
            f.stamp()
            same_recipe = True
        self.records = f.read_stage_records()
        self.timings: dict[str, float] = f.read_timings()
        self._plan(same_recipe)
        tmp = f.recipe.with_name(f"recipe.yaml.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, f.recipe)

    # ---- fingerprints ----------------------------------------------------------------------------
    def stage_inputs(self) -> list[tuple[str, dict[str, Any]]]:
        """Each stage (and curation step) in order with the recipe fields its outputs depend on."""
        r = self.recipe.model_dump(mode="json")
        curate, train = r["curate"], r["train"]
        read = {"sources": r["sources"], "heldout": r["heldout"], "curate.shard_docs": curate["shard_docs"],
                "curate.shard_bytes": curate["shard_bytes"], "curate.keep_rejected": curate["keep_rejected"],
                "source files": self._source_files()}
        stages = [("read", read)]
        stages += [(f"curate/{self.folder.step(i, cfg['step']).name}",
                    {f"curate.steps.{i}": cfg, "curate.keep_rejected": curate["keep_rejected"]})
                   for i, cfg in enumerate(curate["steps"])]
        stages += [
            ("curate", {"curate.steps": [cfg["step"] for cfg in curate["steps"]]}),
            ("tokenizer", {"tokenizer": r["tokenizer"], **self._extra_special()}),
            ("pack", _non_default("pack", r["pack"], PackConfig())),
            ("train", {"model": r["model"],
                       **{f"train.{k}": v for k, v in train.items() if k not in TRAIN_CADENCE}}),
            ("export", {"train.max_steps": train["max_steps"]}),
            ("eval", {"eval": r["eval"], "train.seq_len": train["seq_len"]}),
        ]
        return stages

    def _extra_special(self) -> dict[str, list[str]]:
        """The objective's special tokens as a tokenizer stage input; none (clm) adds no key, so a decoder's
        run folder keeps its fingerprint."""
        tokens = required_tokens(self.recipe.model.objective, self.recipe.model.span_corruption)
        return {"tokenizer.extra_special": tokens} if tokens else {}

    def _source_files(self) -> list[list]:
        """Path, size and modification time of every source file, so edited sources are read again. Sources
        moved away after the read stage keep the documents already read (with a warning)."""
        try:
            return [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
                    for src in self.recipe.sources for p in resolve_paths(src.path)]
        except TokenmillError as err:
            read = self.records.get("read")
            if read is None or not self.folder.read.done:
                raise
            print(f"[tokenmill] warning: {err}; keeping the documents read before")
            return read.inputs["source files"]

    def _plan(self, same_recipe: bool) -> None:
        """Compare every stage's fingerprint with the one its outputs were made with; remove the outputs
        of each stage that changed (and say why), before anything runs. Outputs without a record are
        kept only when the recipe is the one they were made with (``tokenmill train`` under torchrun)."""
        f = self.folder
        self._check_training_length()
        self.fingerprints, upstream, changed = {}, "", ""
        for name, inputs in self.stage_inputs():
            fp = upstream = self.fingerprints[name] = _fingerprint(upstream, inputs)
            record = self.records.get(name)
            if record is not None and record.fingerprint == fp:
                continue
            outputs = [p for p in f.stage_outputs(name) if p.exists()]
            if outputs and (record is not None or not same_recipe):  # made from other inputs: redo
                why = ", ".join(_changes(record.inputs, inputs)) if record else "made by an unrecorded recipe"
                print(f"[tokenmill] {name}: reruns ({why or f'upstream {changed} changed'})")
                changed = changed or name
                for path in outputs:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                self.timings.pop(name.split("/")[0], None)
            self.records[name] = StageRecord(fingerprint=fp, inputs=inputs)
        numbered = {name for name in self.fingerprints if name.startswith("curate/")}
        for step in f.curate.glob("[0-9][0-9]-*") if f.curate.is_dir() else []:
            if f"curate/{step.name}" not in numbered:  # a step the recipe no longer has
                shutil.rmtree(step)
        self.records = {k: v for k, v in self.records.items() if k in self.fingerprints}
        f.write_stage_records(self.records)

    def _check_training_length(self) -> None:
        """Training can be continued to more steps, not undone to fewer."""
        from tokenmill.train.checkpoint import checkpoints

        trained = max((step for step, _ in checkpoints(self.folder.checkpoints)), default=0)
        wanted = self.recipe.train.max_steps
        if trained > wanted:
            raise TokenmillError(
                f"{self.folder.root} holds a run of a different recipe that trained further: train.max_steps "
                f"{trained} -> {wanted}. Training cannot be shortened: export an earlier checkpoint with "
                f"`tokenmill export {self.folder.root} --step N`, or pick another --out, or pass --overwrite.")

    def _stage(self, name: str, done: Callable[[], bool], fn: Callable[[], None]) -> None:
        if done():
            print(f"[tokenmill] {name}: already complete, reused (recipe inputs unchanged)")
            return
        print(f"[tokenmill] {name} ...")
        t0 = time.perf_counter()
        fn()
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)
        write_json_atomic(self.timings, self.folder.timings)

    # ---- stages ------------------------------------------------------------------------------
    def read(self) -> None:
        r, f = self.recipe, self.folder
        ingest(r.sources, f.read.root, f.heldout, r.heldout, shard_docs=r.curate.shard_docs,
               shard_bytes=r.curate.shard_bytes, keep_rejected=r.curate.keep_rejected, progress=self.progress)

    def curate(self) -> None:
        r, f = self.recipe, self.folder
        steps = [STEPS[cfg.step](cfg) for cfg in r.curate.steps]
        with make_executor(r.curate, self.progress) as ex:
            last, stats = run_pipeline(steps, f.read.documents, f, ex, keep_rejected=r.curate.keep_rejected)
        selecting = [s for s in stats if s.counters.get("proxy_flops")]
        if selecting:  # model-based selection ran: record its compute so comparisons can charge it
            f.write_select_cost(sum(s.counters["proxy_flops"] for s in selecting),
                                sum(s.wall_seconds or s.seconds for s in selecting))
        f.write_final(last)

    def curated_shards(self) -> list[Path]:
        return list_shards(self.folder.curated_documents())

    def tokenizer(self) -> None:
        from tokenmill.tokens.tokenizer import prepare_tokenizer

        dest = self.folder.tokenizer
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m = self.recipe.model
        frozen_by = f"model.init_from={m.init_from}" if m.init_from else \
            f"model.grow_from={m.grow_from}" if m.grow_from else None
        prepare_tokenizer(self.recipe.tokenizer, _texts(self.curated_shards()), tmp, progress=self.progress,
                          extra_special=required_tokens(m.objective, m.span_corruption), frozen_by=frozen_by)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)

    def pack(self) -> None:
        from tokenmill.tokens.pack import pack_documents
        from tokenmill.tokens.tokenizer import load_tokenizer

        f = self.folder
        tok = load_tokenizer(f.tokenizer)
        pack_documents(self.curated_shards(), tok, f.train_tokens, progress=self.progress, config=self.recipe.pack)
        if not f.heldout_shard.exists():
            write_parquet_atomic(pq.read_table(f.heldout), f.heldout_shard)
        pack_documents([f.heldout_shard], tok, f.heldout_tokens, progress=self.progress)

    def model_config(self):
        """The recipe's model with the vocabulary and EOS id of the run's tokenizer. With
        ``model.init_from`` the shape is the checkpoint's, and the run's tokenizer must be its own; with
        ``model.grow_from`` it must be the smaller model's."""
        from tokenmill.tokens.tokenizer import load_tokenizer

        tok = load_tokenizer(self.folder.tokenizer)
        grow_from = self.recipe.model.grow_from
        if grow_from is not None:
            from tokenmill.train.sources import source_folders

            source_tokenizer = source_folders(grow_from)[1]
            if tok.get_vocab() != load_tokenizer(source_tokenizer).get_vocab():
                raise TokenmillError(
                    f"model.grow_from={grow_from}: the run's tokenizer ({self.folder.tokenizer}) is not the smaller "
                    f"model's, whose token ids it was trained on; set tokenizer.path: {source_tokenizer}")
        init_from = self.recipe.model.init_from
        if init_from is None:
            ids = {"vocab_size": len(tok), "eos_id": tok.eos_token_id}
            if self.recipe.model.objective != "clm":  # span corruption pads its inputs; encoders export it
                ids["pad_id"] = tok.pad_token_id
            return self.recipe.model.model_copy(update=ids)
        from tokenmill.model.hf import hf_model_config

        if tok.get_vocab() != load_tokenizer(init_from).get_vocab():
            raise TokenmillError(
                f"model.init_from={init_from}: the run's tokenizer ({self.folder.tokenizer}) is not the "
                f"checkpoint's, whose token ids the model was trained on; set tokenizer.path: {init_from}")
        return hf_model_config(init_from).model_copy(update={"init_from": init_from, "eos_id": tok.eos_token_id})

    def train(self) -> None:
        """Also the whole of ``tokenmill train RUN``, which ``torchrun`` starts once per rank."""
        from tokenmill.train.distributed import is_main_process
        from tokenmill.train.loop import train

        f, cfg = self.folder, self.recipe.train
        summary = train(self.model_config(), cfg, f.train_tokens, f.train, val_tokens_dir=f.heldout_tokens,
                        bpb_docs=pq.read_table(f.heldout) if cfg.bpb_every else None, tokenizer_dir=f.tokenizer,
                        progress=self.progress)
        if is_main_process():
            write_json_atomic(summary, f.summary)

    def _trained(self) -> bool:
        """Training is complete when its summary says it reached ``max_steps`` (a raised ``max_steps``
        makes a finished run resume from its last checkpoint)."""
        summary = read_json(self.folder.summary)
        if summary is not None and summary["steps"] < self.recipe.train.max_steps:
            print(f"[tokenmill] train: continues from step {summary['steps']} to {self.recipe.train.max_steps}; "
                  f"the learning-rate schedule is recomputed for {self.recipe.train.max_steps} steps, so the "
                  f"first {summary['steps']} followed the shorter one")
            self.folder.summary.unlink()
            return False
        return summary is not None

    def export(self, step: int | None = None, out: Path | None = None) -> Path:
        """Export the checkpoint of ``step`` (default: the last) to ``out`` (default: ``RUN/model``) in
        Hugging Face format — a Llama for clm, ModernBERT for mlm and electra (its discriminator), T5 for
        span corruption; ``tokenmill_export.json`` there records the step and the training stage's
        fingerprint, which names the recipe inputs the weights came from."""
        from tokenmill.train.checkpoint import checkpoints, load_trained_model

        f = self.folder
        out = Path(out) if out is not None else f.model
        model, cfg = load_trained_model(f.checkpoints, step)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.objective == "clm":
            from tokenmill.model.hf import export_hf

            export_hf(model, cfg, f.tokenizer, tmp)
        elif cfg.objective == "span_corruption":
            from tokenmill.model.hf_seq2seq import export_seq2seq

            export_seq2seq(model, cfg, f.tokenizer, tmp, pad_id=cfg.pad_id, eos_id=cfg.eos_id)
        else:
            from tokenmill.model.hf_encoder import export_encoder

            export_encoder(model, cfg, f.tokenizer, tmp)
        record = f.read_stage_records().get("train")
        write_json_atomic({"step": step if step is not None else checkpoints(f.checkpoints)[-1][0],
                           "train_fingerprint": record.fingerprint if record else None,
                           "run": str(f.root.resolve())}, tmp / "tokenmill_export.json")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out

    def eval_bpb(self) -> None:
        """Bits per byte per domain of the exported model, as ``tokenmill eval --bpb`` recomputes it; for the
        other objectives, the figures that suit each (``tokenmill eval --objective``)."""
        if self.recipe.model.objective != "clm":
            from tokenmill.evaluate.objective_evals import eval_objective

            eval_objective(self.folder.root, progress=self.progress)
            return
        from tokenmill.evaluate.model_evals import eval_bpb

        eval_bpb(self.folder.root, progress=self.progress)

    def report(self) -> None:
        from tokenmill.report.run_report import write_report

        write_report(self.folder.root)

    def stages(self) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
        """(name, is-complete check, action) of every stage, in order."""
        f = self.folder
        stages = [
            ("read", lambda: f.read.done, self.read),
            ("curate", f.final.exists, self.curate),
            ("tokenizer", lambda: (f.tokenizer / "tokenizer.json").exists(), self.tokenizer),
            ("pack", lambda: (f.heldout_tokens / "meta.json").exists(), self.pack),
            ("train", self._trained, self.train),
            ("export", lambda: (f.model / "config.json").exists(), self.export),
            ("eval", lambda: (f.bpb if self.recipe.model.objective == "clm" else f.objective_eval).exists(),
             self.eval_bpb),
            ("report", lambda: False, self.report),
        ]
        return [s for s in stages if s[0] != "eval" or self.recipe.eval.bpb]

    def run(self, until: str | None = None) -> Path:
        """Run every stage not yet complete, stopping after ``until`` when given."""
        if until is not None and until not in STAGES:
            raise TokenmillError(f"--until {until!r}: not a stage; stages are {', '.join(STAGES)}")
        self.folder.create()
        with self.folder.lock():
            self._open()
            for name, done, action in self.stages():
                self._stage(name, done, action)
                if name == until:
                    break
        return self.folder.root


STAGES = ("read", "curate", "tokenizer", "pack", "train", "export", "eval", "report")


def _texts(shards: list[Path]):
    """Curated texts in corpus order, one shard in memory at a time (the tokenizer stage caps them)."""
    for shard in shards:
        yield from pq.read_table(shard, columns=["text"]).column("text").to_pylist()


def make_executor(cfg, progress: bool):
    if cfg.executor == "ray":
        from tokenmill.executors.ray import RayExecutor

        return RayExecutor(address=cfg.ray_address, num_cpus=None if cfg.ray_address else cfg.workers,
                           progress=progress)
    return LocalExecutor(cfg.workers, progress=progress)


def run_recipe(recipe: Recipe, out: Path, *, progress: bool = True, overwrite: bool = False,
               until: str | None = None) -> Path:
    return Runner(recipe, out, progress=progress, overwrite=overwrite).run(until)
