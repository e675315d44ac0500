"""The console tells the truth without a terminal: training, validation, bits-per-byte and resume lines
on stdout with progress bars off (CI, Slurm, Ray logs) and on, and start/finish lines from the stages
that take a while (tokenizer training, packing, bits per byte)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmill.model import Llama, ModelConfig
from tokenmill.model.bpb import bits_per_byte
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import TokenizerConfig, load_tokenizer, prepare_tokenizer, train_tokenizer
from tokenmill.train import loop
from tokenmill.train.checkpoint import latest_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.metrics import console_line

SEQ, VOCAB = 32, 300
DOCS = {
    "prose": ["In the beginning was the word, and the word was with the mill.", "The quick brown fox jumps."],
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"],
}
HELDOUT = pa.table({"text": [t for docs in DOCS.values() for t in docs],
                    "domain": [d for d, docs in DOCS.items() for _ in docs]})


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = train_tokenizer([t for docs in DOCS.values() for t in docs] * 5, VOCAB, root / "tokenizer")
    rows = [(f"{d}-{i}", t, d) for d, docs in DOCS.items() for i, t in enumerate(docs * 40)]
    ids, text, domain = zip(*rows)
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain}), root / "docs.parquet")
    pack_documents([root / "docs.parquet"], tokenizer, root / "packed")
    return root / "packed"


def model_cfg() -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=VOCAB, eos_id=0, max_seq_len=SEQ)


def train_cfg(**overrides) -> TrainConfig:
    base = dict(seq_len=SEQ, micro_batch_size=4, global_batch_tokens=8 * SEQ, max_steps=20, lr=3e-3,
                warmup_steps=3, device="cpu", eval_every=10, eval_windows_per_domain=4, ckpt_every=10, log_every=5)
    return TrainConfig(**{**base, **overrides})


def step_lines(out: str, field: str) -> dict[int, str]:
    """Console lines carrying ``field``, by step."""
    lines = [line for line in out.splitlines() if line.startswith("step ") and f"| {field} " in line]
    return {int(re.match(r"step (\d+)/", line)[1]): line for line in lines}


@pytest.mark.parametrize("progress", [False, True])
def test_training_prints_metric_lines_at_log_and_eval_steps(tokens, tmp_path, capsys, progress):
    loop.train(model_cfg(), train_cfg(bpb_every=10), tokens, tmp_path, val_tokens_dir=tokens, bpb_docs=HELDOUT,
               tokenizer_dir=tokens.parent / "tokenizer", progress=progress)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    train = step_lines(out, "loss")
    assert sorted(train) == [5, 10, 15, 20]
    for record in (r for r in records if "loss" in r):
        line = train[record["step"]]
        assert line.startswith(f"step {record['step']}/20 | loss {record['loss']:.4f} | ")
        assert f"| lr {record['lr']:.2e} |" in line and re.search(r"\| [\d.]+[kMG]? tok/s \|", line)
        assert re.search(r"\| eta \d+(m\d\ds|s)$", line) and "mfu" not in line  # no MFU on CPU
    assert train[20].endswith("| eta 0s")

    val = step_lines(out, "val_loss")
    assert sorted(val) == [10, 20]
    for record in (r for r in records if "val_loss" in r):
        line = val[record["step"]]
        assert line.startswith(f"step {record['step']}/20 | val_loss {record['val_loss']:.4f} (")
        assert f"prose {record['val_loss/prose']:.3f}" in line and f"code {record['val_loss/code']:.3f}" in line
        assert re.search(r"\) \| [\d.]+s$", line)
    bpb = step_lines(out, "bpb")
    assert sorted(bpb) == [10, 20]
    for record in (r for r in records if "bpb" in r):
        line = bpb[record["step"]]
        assert f"| bpb {record['bpb']:.4f} (" in line and f"prose {record['bpb/prose']:.3f}" in line


def test_gpu_line_carries_mfu_and_long_etas_read_in_hours():
    record = {"step": 7, "tokens": 7 << 20, "loss": 2.0, "grad_norm": 0.5, "lr": 1e-4, "tokens_per_s": 2.5e6,
              "mfu": 0.312}
    assert (console_line(record, 100, eta_s=3725)
            == "step 7/100 | loss 2.0000 | gnorm 0.500 | lr 1.00e-04 | 2.5M tok/s | mfu 31.2% | eta 1h02m")


def test_resumed_run_says_from_which_step_and_checkpoint(tokens, tmp_path, capsys):
    loop.train(model_cfg(), train_cfg(max_steps=10), tokens, tmp_path, progress=False)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert "resuming" not in capsys.readouterr().out
    loop.train(model_cfg(), train_cfg(max_steps=15), tokens, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"resuming from step 10 (checkpoint {checkpoint})"
    assert sorted(step_lines(out, "loss")) == [15]


def test_tokenizer_and_pack_print_start_and_finish_lines_with_progress_off(tmp_path, capsys):
    texts = [t for docs in DOCS.values() for t in docs] * 5
    tokenizer = prepare_tokenizer(TokenizerConfig(vocab_size=VOCAB), texts, tmp_path / "tokenizer", progress=False)
    start, finish = capsys.readouterr().out.splitlines()
    assert start == f"tokenizer: training byte-level BPE, vocab_size {VOCAB}"
    n_bytes = sum(len(t.encode()) for t in texts)
    assert re.fullmatch(rf"tokenizer: {len(tokenizer)} tokens from {len(texts)} documents "
                        rf"\({n_bytes:,} bytes\) in [\d.]+s", finish)

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one doc", "two docs"], "domain": ["d", "d"]}),
                   tmp_path / "docs.parquet")
    meta = pack_documents([tmp_path / "docs.parquet"], tokenizer, tmp_path / "packed", progress=False)
    start, finish = capsys.readouterr().out.splitlines()
    assert start == f"pack: 1 of 1 shards (2 documents) into {tmp_path / 'packed'}"
    assert re.fullmatch(rf"pack: {tmp_path / 'packed'} holds 2 documents, {meta['n_tokens']} tokens in 1 shards "
                        r"\(1 packed in [\d.]+s\)", finish)
    pack_documents([tmp_path / "docs.parquet"], tokenizer, tmp_path / "quiet")
    assert capsys.readouterr().out == ""  # a library call says nothing


def test_bits_per_byte_prints_start_and_finish_lines_with_progress_off(tokens, capsys):
    tokenizer = load_tokenizer(tokens.parent / "tokenizer")
    model = Llama(model_cfg())
    result = bits_per_byte(model, tokenizer, HELDOUT, seq_len=SEQ, progress=False)
    start, finish = capsys.readouterr().out.splitlines()
    assert start == f"bpb: scoring 4 documents with seq_len {SEQ}"
    overall = result["overall"]
    assert re.fullmatch(rf"bpb: {overall['bpb']:.4f} over 4 documents \({overall['bytes']:,} bytes, "
                        rf"{overall['tokens']:,} tokens\) in [\d.]+s", finish)
    bits_per_byte(model, tokenizer, HELDOUT, seq_len=SEQ)
    assert capsys.readouterr().out == ""
