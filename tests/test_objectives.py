"""The trainer on every objective: MLM, ELECTRA and span corruption learn, resume to the same batches and
losses, run under 2-process FSDP2 as in one process; the decoder's loss is what it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokenmill import TokenmillError
from tokenmill.model import Llama, ModelConfig
from tokenmill.recipe import dump_recipe, parse_recipe
from tokenmill.runfolder import RunFolder
from tokenmill.tokens.corruption import required_tokens
from tokenmill.tokens.loader import TokenLoader
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import load_tokenizer, train_tokenizer
from tokenmill.train import loop
from tokenmill.train.config import TrainConfig
from tokenmill.train.objectives import CausalLM, build_objective

from test_train import DOCS, read_metrics

SEQ = 32
TRAIN = dict(seq_len=SEQ, micro_batch_size=2, global_batch_tokens=8 * SEQ, max_steps=6, lr=3e-3, warmup_steps=2,
             schedule="constant", device="cpu", eval_every=3, eval_windows_per_domain=4, ckpt_every=3, log_every=1)
MODEL = dict(preset="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64)


def make_run(root: Path, objective: str) -> Path:
    """A run folder as `tokenmill run --until pack` leaves it, for ``objective``."""
    recipe = parse_recipe({"name": objective, "sources": [{"path": str(root / "docs.parquet")}],
                           "model": {**MODEL, "objective": objective}, "train": TRAIN})
    texts = [t for docs in DOCS.values() for t in docs]
    tokenizer = train_tokenizer(texts * 5, vocab_size=300, out_dir=root / "tokens" / "tokenizer",
                                extra_special=required_tokens(objective, recipe.model.span_corruption))
    rows = [(f"{d}-{i}", t, d) for d, docs in DOCS.items() for i, t in enumerate(docs * 40)]
    ids, text, domain = zip(*rows)
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain}), root / "docs.parquet")
    pack_documents([root / "docs.parquet"], tokenizer, root / "tokens" / "train")
    pack_documents([root / "docs.parquet"], tokenizer, root / "tokens" / "heldout")
    (root / "recipe.yaml").write_text(dump_recipe(recipe))
    RunFolder(root).stamp()
    return root


@pytest.fixture(scope="module", params=["mlm", "electra", "span_corruption"])
def run(request, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp(request.param), request.param)


def model_config(run: Path) -> ModelConfig:
    from tokenmill.recipe import load_recipe
    from tokenmill.run import Runner

    return Runner(load_recipe(run / "recipe.yaml"), run, progress=False).model_config()


def train(run: Path, out: Path, **overrides) -> dict:
    return loop.train(model_config(run), TrainConfig(**{**TRAIN, **overrides}), run / "tokens" / "train", out,
                      val_tokens_dir=run / "tokens" / "heldout", tokenizer_dir=run / "tokens" / "tokenizer",
                      progress=False)


def test_each_objective_learns_and_validates(run, tmp_path):
    lr = 1e-3 if model_config(run).objective == "electra" else 3e-3  # λ=50 on the RTD loss: 3e-3 oscillates
    summary = train(run, tmp_path / "out", max_steps=24, eval_every=12, log_every=4, lr=lr)
    records = read_metrics(tmp_path / "out")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.85 * losses[0], losses
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [12, 24] and {"val_loss/prose", "val_loss/code"} <= set(val[-1])
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert summary["params"] > 0 and summary["memory"]["param_bytes"] > 0
    train_lines = [r for r in records if "loss" in r]
    if model_config(run).objective == "electra":  # the combined loss's parts, logged beside it
        weight = model_config(run).electra.discriminator_weight
        for r in train_lines:
            assert r["loss"] == pytest.approx(r["mlm_loss"] + weight * r["rtd_loss"], rel=1e-5)
            assert 0 <= r["rtd_accuracy"] <= 1
    else:
        assert not {"mlm_loss", "rtd_loss", "rtd_accuracy"} & set(train_lines[-1])


def test_a_killed_run_resumes_to_the_same_batches_and_losses(run, tmp_path, monkeypatch):
    whole = train(run, tmp_path / "whole")
    real_batch, accum = TokenLoader.batch, TrainConfig(**TRAIN).grad_accum_steps()

    def batch(self, step):  # Ctrl-C while loading step 5's batches; the checkpoint of step 3 survives
        if step == 4 * accum:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TokenLoader, "batch", batch)
    with pytest.raises(KeyboardInterrupt):
        train(run, tmp_path / "killed")
    monkeypatch.undo()
    resumed = train(run, tmp_path / "killed")
    after = lambda out: [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r and r["step"] > 3]
    assert [s for s, _ in after(tmp_path / "killed")] == [4, 5, 6]
    assert after(tmp_path / "killed") == pytest.approx(after(tmp_path / "whole"), rel=1e-6)
    assert resumed["final_val_loss"] == pytest.approx(whole["final_val_loss"], rel=1e-6)


def test_two_fsdp2_processes_match_one(tmp_path):
    """ELECTRA, the objective with the most moving parts (a generator sampling replacements, shared
    embeddings): 2 ranks under torchrun + FSDP2 see and sample exactly what one process does."""
    run = make_run(tmp_path / "electra", "electra")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "train", str(run), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [r for r in read_metrics(run / "train") if "loss" in r or "val_loss" in r]
    train(run, tmp_path / "one", micro_batch_size=2)  # one process accumulates both ranks' micro-batches
    one = [r for r in read_metrics(tmp_path / "one") if "loss" in r or "val_loss" in r]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        for key in a:
            if key.startswith(("loss", "val_loss")):
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_the_decoder_loss_is_the_mean_next_token_loss(tmp_path):
    cfg = ModelConfig(preset="tiny", vocab_size=300, max_seq_len=SEQ)
    torch.manual_seed(0)
    model = Llama(cfg)
    x, y = torch.randint(0, 300, (3, SEQ)), torch.randint(0, 300, (3, SEQ))
    _, per_token = model(x, y, reduction="none")
    losses = CausalLM(SEQ).losses(model, x, y, np.arange(3), torch.device("cpu"), doc_mask=False)
    assert torch.allclose(losses, per_token.mean(dim=1)) and torch.allclose(losses.mean(), model(x, y)[1])


def test_an_objective_needs_its_special_tokens(tmp_path):
    train_tokenizer([t for docs in DOCS.values() for t in docs] * 5, 300, tmp_path / "tok")  # clm's: no <mask>
    for objective in ("mlm", "span_corruption"):
        with pytest.raises(TokenmillError, match="has no '<(mask|extra_id_0)>'"):
            build_objective(ModelConfig(**MODEL, objective=objective), TrainConfig(**TRAIN), load_tokenizer(tmp_path / "tok"))
    with pytest.raises(TokenmillError, match="needs the run's tokenizer"):
        build_objective(ModelConfig(**MODEL, objective="mlm"), TrainConfig(**TRAIN), None)


@pytest.mark.parametrize("override, message", [
    ({"model": {**MODEL, "objective": "mlm", "masking": {"mask_rate": 1.2}}}, "mask_rate"),
    ({"model": {**MODEL, "objective": "mlm"}, "train": {**TRAIN, "bpb_every": 3}}, "bpb_every"),
    ({"model": {**MODEL, "objective": "mlm"}, "train": {**TRAIN, "doc_mask": True}}, "doc_mask"),
    ({"model": {**MODEL, "objective": "span_corruption", "span_corruption": {"preset": None, "denoisers": [
        {"mean_span_length": 40, "noise_density": 0.15}]}}}, "spans do not fit"),
    ({"model": {**MODEL, "masking": {"mask_rate": 0.2}}}, "does not apply to objective clm"),
])
def test_bad_objective_settings_fail_validation(override, message):
    with pytest.raises(TokenmillError, match=message):
        parse_recipe({"name": "x", "sources": [{"path": "docs.parquet"}], "train": TRAIN, **override})


def test_an_encoder_recipe_runs_end_to_end(tmp_path):
    """`tokenmill run` for ELECTRA: special tokens in the tokenizer, training, the ModernBERT export that
    AutoModelForTokenClassification loads, eval/objective.json and the report."""
    from transformers import AutoModelForTokenClassification

    from tokenmill.cli import main

    demo = Path(__file__).parents[1] / "src" / "tokenmill" / "recipes" / "demo.yaml"
    sets = ["model.objective=electra", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "train.bpb_every=null",
            "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=4", "train.ckpt_every=4",
            "train.seq_len=64", "train.micro_batch_size=8", "train.global_batch_tokens=512",
            "eval.max_docs_per_domain=4", "curate.steps=[]"]
    assert main(["run", str(demo), "--out", str(tmp_path / "run"), "--no-progress",
                 *[arg for s in sets for arg in ("--set", s)]]) == 0
    folder = RunFolder(tmp_path / "run")
    result = folder.read_objective_eval()
    assert result.objective == "electra" and 0 <= result.overall.rtd_accuracy <= 1
    assert result.probe is not None and 0 <= result.probe.accuracy <= 1
    model = AutoModelForTokenClassification.from_pretrained(folder.model)
    assert type(model).__name__ == "ModernBertForTokenClassification" and model.config.num_labels == 1
    assert "AutoModelForTokenClassification" in folder.report.read_text(encoding="utf-8")
