"""Run a recipe end to end into a run folder, stage by stage, skipping whatever is already complete.

Every stage writes its outputs atomically and is recognised as complete by a file it writes last, so
``tokenmill run`` after a crash or Ctrl-C picks up where it stopped: curation per shard, packing per
shard, training from the last checkpoint. ``timings.json`` records each stage's wall time.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from tokenmill import TokenmillError
from tokenmill.curate.pipeline import run_pipeline
from tokenmill.documents.ingest import ingest
from tokenmill.documents.shards import list_shards, write_parquet_atomic
from tokenmill.executors import LocalExecutor
from tokenmill.files import write_json_atomic
from tokenmill.recipe import Recipe, dump_recipe
from tokenmill.runfolder import RunFolder
from tokenmill.steps import STEPS


def _check_same_recipe(folder: RunFolder, text: str) -> None:
    if folder.recipe.exists() and folder.recipe.read_text(encoding="utf-8") != text:
        raise TokenmillError(
            f"{folder.root} holds a run of a different recipe ({folder.recipe} differs from this one). "
            f"Resume it with the same recipe and overrides, pick another --out, or pass --overwrite.")


class Runner:
    def __init__(self, recipe: Recipe, out: Path, *, progress: bool = True, overwrite: bool = False):
        self.recipe = recipe
        self.folder = RunFolder(out)
        self.progress = progress
        self.overwrite = overwrite

    def _open(self) -> None:
        """Claim the folder: create it (or empty it with ``--overwrite``) and write the recipe, which must
        be the one a resumed run was started with. Called with the folder's lock held."""
        f, text = self.folder, dump_recipe(self.recipe)
        if self.overwrite and f.root.is_dir():
            for child in f.root.iterdir():
                if child != f.lock_file:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        _check_same_recipe(f, text)
        if f.recipe.exists():
            f.require()
        else:
            f.stamp()
        if not f.recipe.exists():  # under torchrun every rank gets here: write once, atomically
            tmp = f.recipe.with_name(f"recipe.yaml.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, f.recipe)
        self.timings: dict[str, float] = f.read_timings()

    def _stage(self, name: str, done: Callable[[], bool], fn: Callable[[], None]) -> None:
        if done():
            print(f"[tokenmill] {name}: already complete, skipped")
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
        prepare_tokenizer(self.recipe.tokenizer, _texts(self.curated_shards()), tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)

    def pack(self) -> None:
        from tokenmill.tokens.pack import pack_documents
        from tokenmill.tokens.tokenizer import load_tokenizer

        f = self.folder
        tok = load_tokenizer(f.tokenizer)
        pack_documents(self.curated_shards(), tok, f.train_tokens)
        if not f.heldout_shard.exists():
            write_parquet_atomic(pq.read_table(f.heldout), f.heldout_shard)
        pack_documents([f.heldout_shard], tok, f.heldout_tokens)

    def model_config(self):
        """The recipe's model with the vocabulary and EOS id of the run's tokenizer. With
        ``model.init_from`` the shape is the checkpoint's, and the run's tokenizer must be its own."""
        from tokenmill.tokens.tokenizer import load_tokenizer

        tok = load_tokenizer(self.folder.tokenizer)
        init_from = self.recipe.model.init_from
        if init_from is None:
            return self.recipe.model.model_copy(update={"vocab_size": len(tok), "eos_id": tok.eos_token_id})
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

    def export(self) -> None:
        from tokenmill.model.hf import export_hf
        from tokenmill.train.checkpoint import load_trained_model

        f = self.folder
        model, cfg = load_trained_model(f.checkpoints)
        tmp = f.model.with_name(f.model.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_hf(model, cfg, f.tokenizer, tmp)
        shutil.rmtree(f.model, ignore_errors=True)
        tmp.rename(f.model)

    def eval_bpb(self) -> None:
        """Bits per byte per domain of the exported model, as ``tokenmill eval --bpb`` recomputes it."""
        from tokenmill.evaluate.model_evals import eval_bpb

        eval_bpb(self.folder.root)

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
            ("train", f.summary.exists, self.train),
            ("export", lambda: (f.model / "config.json").exists(), self.export),
            ("eval", f.bpb.exists, self.eval_bpb),
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
