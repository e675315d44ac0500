"""Data-parallel training: 2 CPU processes (torchrun, gloo, FSDP2) against one, and resharded resume.

``tokenmill train RUN --nproc 2`` trains a packed run folder on two ranks; the same run in one process
with twice the gradient accumulation sees the same sequences per step, so the two loss curves agree to
float rounding. The 2-rank checkpoint then resumes in one process (DCP reshards it) and continues on
the single-process curve. Muon and GaLore, which need whole matrices, do the same, and also resume on
two processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tokenmill.recipe import dump_recipe, parse_recipe
from tokenmill.runfolder import RunFolder
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer
from tokenmill.train import loop
from tokenmill.train.config import TrainConfig

SEQ = 32
DOCS = {
    "prose": ["In the beginning was the word, and the word was with the mill.", "The quick brown fox jumps."],
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"],
}
TRAIN = dict(seq_len=SEQ, micro_batch_size=2, global_batch_tokens=8 * SEQ, max_steps=6, lr=3e-3, warmup_steps=2,
             schedule="constant", device="cpu", eval_every=3, eval_windows_per_domain=4, ckpt_every=3,
             log_every=1, bpb_every=3, bpb_docs_per_domain=2)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory) -> Path:
    """A run folder as `tokenmill run` leaves it after packing: recipe, tokenizer, tokens, held-out docs."""
    run = tmp_path_factory.mktemp("dist") / "run"
    texts = [t for docs in DOCS.values() for t in docs]
    tokenizer = train_tokenizer(texts * 5, vocab_size=300, out_dir=run / "tokens" / "tokenizer")
    rows = [(f"{d}-{i}", t, d) for d, docs in DOCS.items() for i, t in enumerate(docs * 40)]
    ids, text, domain = zip(*rows)
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain}), run / "docs.parquet")
    (run / "heldout").mkdir()
    heldout = pa.table({"text": texts, "domain": [d for d, docs in DOCS.items() for _ in docs]})
    pq.write_table(heldout, run / "heldout" / "documents.parquet")
    pack_documents([run / "docs.parquet"], tokenizer, run / "tokens" / "train")
    pack_documents([run / "docs.parquet"], tokenizer, run / "tokens" / "heldout")
    recipe = parse_recipe({"name": "dist", "sources": [{"path": str(run / "docs.parquet")}],
                           "model": {"preset": "tiny", "max_seq_len": SEQ}, "train": TRAIN})
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    RunFolder(run).stamp()
    return run


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _single(run: Path, out: Path, **overrides) -> list[dict]:
    """The run's training in this process (world size 1), into ``out``."""
    from tokenmill.run import Runner
    from tokenmill.recipe import load_recipe

    runner = Runner(load_recipe(run / "recipe.yaml"), run, progress=False)
    loop.train(runner.model_config(), TrainConfig(**{**TRAIN, **overrides}), run / "tokens" / "train", out,
               val_tokens_dir=run / "tokens" / "heldout", bpb_docs=pq.read_table(run / "heldout" / "documents.parquet"),
               tokenizer_dir=run / "tokens" / "tokenizer", progress=False)
    return _records(out)


def _curve(records: list[dict]) -> list[dict]:
    """What training computed, without the timings."""
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(("loss", "grad_norm", "val_loss", "bpb", "lr"))}
            for r in records]


def _assert_same_curve(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("loss", "grad_norm", "val_loss", "bpb", "lr")):
                assert ra[key] == pytest.approx(rb[key], rel=rel), (ra["step"], key)


def test_two_processes_match_one_and_resume_resharded(packed_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "train", str(packed_run), "--nproc", "2",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _records(packed_run / "train")
    summary = json.loads((packed_run / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == TRAIN["max_steps"]
    assert {"bpb", "bpb/prose", "val_loss/code", "loss/code"} <= {k for r in two for k in r}

    reference = _single(packed_run, tmp_path / "one", max_steps=12)  # accumulates 4 micro-batches, not 2
    _assert_same_curve(two, [r for r in reference if r["step"] <= TRAIN["max_steps"]])

    resumed = tmp_path / "resumed"  # the 2-rank checkpoint at step 6, continued in one process
    shutil.copytree(packed_run / "train", resumed)
    _assert_same_curve(_single(packed_run, resumed, max_steps=12), reference)


RUN_OPTIMIZERS = {"muon": {"name": "muon"}, "galore": {"name": "galore", "rank": 8, "update_proj_gap": 4}}


def _copy_untrained(packed: Path, run: Path) -> None:
    """``packed`` without its training output (``train/``, not ``tokens/train/``)."""
    shutil.copytree(packed, run, ignore=lambda folder, names: ["train"] if Path(folder) == packed else [])


def _with_train(run: Path, **overrides) -> None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"].update(overrides)
    (run / "recipe.yaml").write_text(dump_recipe(parse_recipe(recipe)))


def _torchrun(run: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "train", str(run), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", RUN_OPTIMIZERS)
def test_muon_and_galore_two_processes_match_one_and_resume(name, packed_run, tmp_path):
    """Muon and GaLore gather each sharded matrix for its whole-matrix step, so they follow the 1-process
    curve too: GaLore to float rounding like AdamW, Muon to 1e-3, as its bf16 Newton–Schulz turns
    summation-order differences into bf16 roundings. Resumed from step 9 (GaLore's projection was
    refreshed at 9, so the restored one is used) on 2 processes, a run continues bit-identically (DCP
    restores Muon's sharded momentum and GaLore's replicated state on both ranks); in 1 process, resharded,
    it continues on the 1-process curve."""
    optimizer, rel = RUN_OPTIMIZERS[name], {"muon": 1e-3, "galore": 1e-5}[name]
    run = tmp_path / "run"
    _copy_untrained(packed_run, run)
    _with_train(run, optimizer=optimizer, max_steps=12)
    _torchrun(run)  # checkpoints at 3, 6, 9, 12; the last two kept
    two = _records(run / "train")
    reference = _single(packed_run, tmp_path / "one", max_steps=12, optimizer=optimizer)
    _assert_same_curve(two, reference, rel=rel)

    shutil.rmtree(run / "train" / "checkpoints" / "step-12")
    shutil.copytree(run / "train", tmp_path / "resharded")
    _torchrun(run)  # resumes from step 9
    assert _curve(_records(run / "train")) == _curve(two)
    _assert_same_curve(_single(packed_run, tmp_path / "resharded", max_steps=12, optimizer=optimizer), reference,
                       rel=rel)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_nccl_bf16_compiled_train(packed_run, tmp_path):
    run = tmp_path / "run"
    _copy_untrained(packed_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"].update(device="cuda", dtype="bfloat16", compile=True, activation_checkpointing="selective")
    (run / "recipe.yaml").write_text(dump_recipe(parse_recipe(recipe)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "train", str(run), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in _records(run / "train") if "loss" in r]
    assert losses[-1] < losses[0] and all(r["peak_memory_gib"] for r in _records(run / "train") if "loss" in r)
