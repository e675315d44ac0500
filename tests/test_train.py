"""The trainer: schedules, optimizer groups, atomic checkpoints, the loop, resume, NaN detection.

The loop runs on a real packed tokens directory: a small tokenizer and two memorisable 'domains'.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from torch.distributed.checkpoint import FileSystemReader

from tokenmill import TokenmillError
from tokenmill.model import Llama, ModelConfig
from tokenmill.tokens.loader import TokenLoader
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer
from tokenmill.train import checkpoint, loop
from tokenmill.train.checkpoint import latest_checkpoint, load_checkpoint, load_trained_model, save_checkpoint
from tokenmill.train.config import TrainConfig
from tokenmill.train.optim import build_adamw
from tokenmill.train.schedule import constant, cosine, wsd

SEQ, VOCAB, EOS = 32, 300, 0


DOCS = {
    "prose": ["In the beginning was the word, and the word was with the mill.", "The quick brown fox jumps."],
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n"],
}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """Each domain's few documents repeated, so a tiny model can learn them within ~30 steps."""
    root = tmp_path_factory.mktemp("tokens")
    texts = [t for docs in DOCS.values() for t in docs]
    tokenizer = train_tokenizer(texts * 5, vocab_size=VOCAB, out_dir=root / "tokenizer")
    assert tokenizer.eos_token_id == EOS and len(tokenizer) <= VOCAB  # what model_cfg() assumes
    rows = [(f"{d}-{i}", t, d) for d, docs in DOCS.items() for i, t in enumerate(docs * 40)]
    ids, text, domain = zip(*rows)
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain}), root / "docs.parquet")
    pack_documents([root / "docs.parquet"], tokenizer, root / "packed")
    return root / "packed"


def model_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "vocab_size": VOCAB, "eos_id": EOS, "max_seq_len": SEQ, **overrides})


def train_cfg(**overrides) -> TrainConfig:
    base = dict(
        seq_len=SEQ, micro_batch_size=4, global_batch_tokens=8 * SEQ, max_steps=20, lr=3e-3, warmup_steps=3,
        device="cpu", eval_every=10, eval_windows_per_domain=4, ckpt_every=10, log_every=5,
    )
    return TrainConfig(**{**base, **overrides})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_killed(cfg: TrainConfig, tokens: Path, out: Path, monkeypatch, die_in_step: int) -> None:
    """Train into ``out`` until a KeyboardInterrupt (as Ctrl-C) while loading step ``die_in_step``'s
    batches; a rerun of the same ``loop.train`` then resumes it."""
    real_batch = TokenLoader.batch

    def batch(self, step):
        if step == (die_in_step - 1) * cfg.grad_accum_steps():
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TokenLoader, "batch", batch)
    with pytest.raises(KeyboardInterrupt):
        loop.train(model_cfg(), cfg, tokens, out, progress=False)
    monkeypatch.undo()


# ---- schedules and config ----------------------------------------------------------------------


def test_cosine_warms_up_then_decays_to_min_at_last_step():
    lrs = [cosine(s, 10, 100, 0.1) for s in range(100)]
    assert lrs[:10] == sorted(lrs[:10]) and lrs[9] == 1.0 and lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert cosine(10 + 89 // 2, 10, 100, 0.1) == pytest.approx(0.55, abs=0.02)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_is_flat_then_decays_in_the_last_fraction(shape):
    lrs = [wsd(s, 5, 100, 0.0, 0.2, shape) for s in range(100)]
    assert all(lr == 1.0 for lr in lrs[5:80])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(0.0)


def test_wsd_decay_shapes_differ_as_named():
    quarter = 80 + round(0.25 * 19)
    linear, sqrt, cos = (wsd(quarter, 0, 100, 0.0, 0.2, s) for s in ("linear", "sqrt", "cosine"))
    assert sqrt < linear < cos
    assert constant(2, 4) == 0.75 and constant(50, 4) == 1.0


def test_grad_accumulation_is_derived_and_validated():
    cfg = train_cfg(micro_batch_size=2, global_batch_tokens=8 * SEQ)
    assert cfg.grad_accum_steps() == 4 and cfg.grad_accum_steps(world_size=2) == 2
    with pytest.raises(TokenmillError, match="global_batch_tokens"):
        cfg.grad_accum_steps(world_size=3)
    with pytest.raises(TokenmillError, match="micro_batch_size"):
        train_cfg(global_batch_tokens=5 * SEQ)


@pytest.mark.parametrize("setting", [{"betas": [1.5, -2]}, {"betas": [0.9, 1.0]}, {"lr": math.inf},
                                     {"weight_decay": math.inf}])
def test_invalid_optimizer_settings_fail_validation_naming_the_field(setting):
    with pytest.raises(ValidationError, match=rf"(?m)^{next(iter(setting))}"):
        train_cfg(**setting)


def test_weight_decay_only_on_matrices():
    model = Llama(model_cfg())
    opt = build_adamw(model, train_cfg(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_are_atomic_pruned_and_restorable(tmp_path, monkeypatch):
    model = Llama(model_cfg())
    opt = build_adamw(model, train_cfg(), torch.device("cpu"))
    model(torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ)))[1].backward()
    opt.step()
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(ckpts, step, model, opt, {"note": step}, keep_last_k=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_rng_state", crash)  # dies after the shards of step 4, before the rest
    with pytest.raises(OSError):
        save_checkpoint(ckpts, 4, model, opt, {}, keep_last_k=2)
    monkeypatch.undo()
    assert (ckpts / "step-4.tmp").exists() and latest_checkpoint(ckpts) == ckpts / "step-3"

    fresh = Llama(model_cfg())
    fresh_opt = build_adamw(fresh, train_cfg(), torch.device("cpu"))
    state = load_checkpoint(ckpts / "step-3", fresh, fresh_opt)
    assert state == {"note": 3, "step": 3}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    save_checkpoint(ckpts, 5, model, opt, {}, keep_last_k=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3", "step-5"]  # stale .tmp cleaned up


# ---- the loop ------------------------------------------------------------------------------------


def test_train_learns_logs_and_checkpoints(tokens, tmp_path):
    out = tmp_path / "run"
    summary = loop.train(model_cfg(), train_cfg(max_steps=30, log_every=5), tokens, out,
                         val_tokens_dir=tokens, progress=False)
    records = read_metrics(out)
    train_recs = [r for r in records if "loss" in r]
    val_recs = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20, 25, 30]
    assert set(train_recs[0]) == {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                                  "peak_memory_gib", "elapsed_s", "loss/prose", "loss/code", "mix/prose", "mix/code"}
    assert all(r["mix/prose"] + r["mix/code"] == pytest.approx(1) for r in train_recs)  # the realised mixture
    assert train_recs[0]["tokens"] == 5 * 8 * SEQ and train_recs[0]["mfu"] is None
    assert train_recs[0]["peak_memory_gib"] is None  # CUDA only
    for r in train_recs:  # the mean over all sequences lies between the two domains' means
        assert min(r["loss/prose"], r["loss/code"]) <= r["loss"] <= max(r["loss/prose"], r["loss/code"])
    assert train_recs[-1]["loss"] < 0.6 * train_recs[0]["loss"]
    assert [r["step"] for r in val_recs] == [10, 20, 30]
    assert set(val_recs[0]) == {"step", "tokens", "val_loss", "val_loss/prose", "val_loss/code"}
    assert val_recs[-1]["val_loss"] < val_recs[0]["val_loss"]
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 8 * SEQ
    assert summary["final_loss"] == train_recs[-1]["loss"] and summary["final_val_loss"] == val_recs[-1]["val_loss"]
    assert summary["params"] == Llama(model_cfg()).num_params()
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-30"


def test_resume_after_crash_is_bit_identical(tokens, tmp_path, monkeypatch):
    cfg = train_cfg(max_steps=20, ckpt_every=10, log_every=1, doc_mask=True)
    loop.train(model_cfg(), cfg, tokens, tmp_path / "straight", progress=False)

    train_killed(cfg, tokens, tmp_path / "resumed", monkeypatch, die_in_step=14)
    assert max(r["step"] for r in read_metrics(tmp_path / "resumed")) == 13  # logged steps 11..13, then died
    summary = loop.train(model_cfg(), cfg, tokens, tmp_path / "resumed", progress=False)

    weights = [load_trained_model(p / "checkpoints")[0].state_dict() for p in (tmp_path / "straight", tmp_path / "resumed")]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 21))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [(r["loss"], r["grad_norm"], r["lr"]) for r in straight]
    assert summary["final_loss"] == straight[-1]["loss"] and summary["steps"] == 20


def test_rerun_after_a_kill_between_last_save_and_pruning_prunes_and_summarises(tokens, tmp_path, monkeypatch):
    cfg = train_cfg(max_steps=15, ckpt_every=5, keep_last_k=2)
    real_checkpoints = checkpoint.checkpoints

    def killed_when_pruning(ckpt_dir):  # the listing pruning starts with, once step 15 is published
        found = real_checkpoints(ckpt_dir)
        if found and found[-1][0] == cfg.max_steps:
            raise KeyboardInterrupt
        return found

    monkeypatch.setattr(checkpoint, "checkpoints", killed_when_pruning)
    with pytest.raises(KeyboardInterrupt):
        loop.train(model_cfg(), cfg, tokens, tmp_path, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-15", "step-5"]

    summary = loop.train(model_cfg(), cfg, tokens, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-15"]
    last = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert summary["steps"] == last["step"] == 15 and summary["final_loss"] == last["loss"]
    assert summary["seconds"] >= last["elapsed_s"] > 0  # the run's training time, not this rerun's
    assert summary["tokens_per_s"] > 0 and summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"])


def test_non_finite_loss_names_step_and_last_good_checkpoint(tokens, tmp_path):
    model = Llama(model_cfg())
    calls = []

    def poison(module, args, output):  # one forward per step (no accumulation): NaN from step 7
        calls.append(1)
        return output * math.nan if len(calls) >= 7 else output

    model.norm.register_forward_hook(poison)
    cfg = train_cfg(global_batch_tokens=4 * SEQ, ckpt_every=5, log_every=4)
    with pytest.raises(TokenmillError, match=r"at step 7; last good checkpoint: .*step-5"):
        loop.train(model_cfg(), cfg, tokens, tmp_path / "run", init_model=model, progress=False)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-5"


def test_bad_run_inputs_are_named(tokens, tmp_path):
    with pytest.raises(TokenmillError, match="max_seq_len"):
        loop.train(model_cfg(), train_cfg(seq_len=64, global_batch_tokens=4 * 64), tokens, tmp_path, progress=False)
    with pytest.raises(TokenmillError, match="eos_id"):
        loop.train(model_cfg(eos_id=None), train_cfg(doc_mask=True), tokens, tmp_path, progress=False)


def test_bf16_autocast_trains_with_fp32_master_weights(tokens, tmp_path):
    summary = loop.train(model_cfg(), train_cfg(dtype="bfloat16", max_steps=10), tokens, tmp_path, progress=False)
    first = read_metrics(tmp_path)[0]["loss"]
    assert summary["final_loss"] < first
    stored = FileSystemReader(tmp_path / "checkpoints" / "step-10").read_metadata().state_dict_metadata
    assert {meta.properties.dtype for key, meta in stored.items() if key.startswith("model.")} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compiled_training_learns(tokens, tmp_path):
    cfg = train_cfg(device="cuda", compile=True, max_steps=30)
    summary = loop.train(model_cfg(), cfg, tokens, tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run")
    assert summary["final_loss"] < 0.6 * records[0]["loss"]
    assert all(r["peak_memory_gib"] > 0 for r in records if "loss" in r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_cuda_compiled_training_with_activation_checkpointing_learns(tokens, tmp_path, mode):
    cfg = train_cfg(device="cuda", compile=True, activation_checkpointing=mode, max_steps=30)
    summary = loop.train(model_cfg(), cfg, tokens, tmp_path / "run", progress=False)
    assert summary["final_loss"] < 0.6 * read_metrics(tmp_path / "run")[0]["loss"]


# ---- parallelize, metrics and continued pretraining -----------------------------------------------


@pytest.mark.parametrize("mode, selective_ac, wrapped", [("full", "op", [0, 1, 2]), ("selective", "op", [0, 1, 2]),
                                                         ("selective", 2, [0, 2])])
def test_activation_checkpointing_keeps_names_and_gradients(mode, selective_ac, wrapped):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from tokenmill.train.parallelize import parallelize

    torch.manual_seed(0)
    plain = Llama(model_cfg(n_layers=3))
    checkpointed = parallelize(Llama(model_cfg(n_layers=3)), train_cfg(activation_checkpointing=mode,
                                                                       selective_ac=selective_ac), None)
    checkpointed.load_state_dict(plain.state_dict())
    assert [i for i, b in enumerate(checkpointed.layers) if isinstance(b, CheckpointWrapper)] == wrapped
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints and export unaffected
    x, y = torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ))
    for model in (plain, checkpointed):
        model(x, y)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_per_domain_loss_follows_the_mixture(tokens, tmp_path):
    loop.train(model_cfg(), train_cfg(max_steps=5, domain_weights={"prose": 1.0}), tokens, tmp_path, progress=False)
    record = read_metrics(tmp_path)[-1]
    assert "loss/code" not in record and record["loss/prose"] == pytest.approx(record["loss"], rel=1e-6)


def test_in_loop_bits_per_byte_per_domain(tokens, tmp_path):
    heldout = pa.table({"text": [t for docs in DOCS.values() for t in docs],
                        "domain": [d for d, docs in DOCS.items() for _ in docs]})
    cfg = train_cfg(max_steps=20, bpb_every=10)
    with pytest.raises(TokenmillError, match="bpb_every"):
        loop.train(model_cfg(), cfg, tokens, tmp_path, progress=False)
    loop.train(model_cfg(), cfg, tokens, tmp_path, bpb_docs=heldout, tokenizer_dir=tokens.parent / "tokenizer",
               progress=False)
    bpb = [r for r in read_metrics(tmp_path) if "bpb" in r]
    assert [r["step"] for r in bpb] == [10, 20]
    assert set(bpb[0]) == {"step", "tokens", "bpb", "bpb/prose", "bpb/code"}
    assert min(bpb[0]["bpb/prose"], bpb[0]["bpb/code"]) <= bpb[0]["bpb"] <= max(bpb[0]["bpb/prose"], bpb[0]["bpb/code"])
    assert bpb[1]["bpb"] < bpb[0]["bpb"]  # the documents are in the training data: it learns them


def test_missing_tracker_packages_fail_before_training(tokens, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TokenmillError, match="pip install tensorboard"):
        loop.train(model_cfg(), train_cfg(tensorboard=True), tokens, tmp_path / "tb", progress=False)
    with pytest.raises(TokenmillError, match="pip install wandb"):
        loop.train(model_cfg(), train_cfg(wandb={"project": "p"}), tokens, tmp_path / "wb", progress=False)
    assert not latest_checkpoint(tmp_path / "tb" / "checkpoints") and not latest_checkpoint(tmp_path / "wb" / "checkpoints")


def test_wandb_gets_every_metric_line_offline(tokens, tmp_path, monkeypatch):
    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or Run(),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    loop.train(model_cfg(), train_cfg(max_steps=10, wandb={"project": "mill"}), tokens, tmp_path, progress=False)
    assert inits[0]["project"] == "mill" and inits[0]["mode"] == "offline" and inits[0]["id"] == "abc123"
    assert [step for step, _ in logged[:-1]] == [r["step"] for r in read_metrics(tmp_path)]
    assert logged[0][1]["loss"] == read_metrics(tmp_path)[0]["loss"] and logged[-1] == "finished"


def test_continued_pretraining_from_hf_checkpoint_round_trips(tmp_path):
    """A zero-learning-rate run from an HF checkpoint exports a model with the source's exact logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tokenmill.recipe import parse_recipe
    from tokenmill.run import run_recipe

    texts = [t for docs in DOCS.values() for t in docs] * 10
    source = tmp_path / "hf"
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB, out_dir=source)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, eos_token_id=tokenizer.eos_token_id)).eval()
    hf.save_pretrained(source)
    with open(tmp_path / "docs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"id": str(i), "text": t, "domain": "mixed"}) + "\n" for i, t in enumerate(texts))
    recipe = parse_recipe({
        "name": "continue", "sources": [{"path": str(tmp_path / "docs.jsonl")}],
        "tokenizer": {"path": str(source)}, "model": {"init_from": str(source)},
        "train": {**train_cfg(lr=0.0, max_steps=2).model_dump(), "eval_every": 2},
        "eval": {"bpb": False},
    })
    run = run_recipe(recipe, tmp_path / "run", progress=False)

    exported = AutoModelForCausalLM.from_pretrained(run / "model", local_files_only=True).eval()
    idx = torch.randint(0, len(tokenizer), (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, hf(idx).logits, rtol=1e-6, atol=1e-6)
    assert json.loads((run / "model" / "config.json").read_text())["vocab_size"] == len(tokenizer)  # unpadded


def test_continued_pretraining_needs_the_checkpoints_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenmill.recipe import parse_recipe
    from tokenmill.run import Runner

    source = tmp_path / "hf"
    tokenizer = train_tokenizer(["the quick brown fox"] * 20, vocab_size=280, out_dir=source)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4)).save_pretrained(source)
    train_tokenizer([t for docs in DOCS.values() for t in docs] * 5, vocab_size=VOCAB,
                    out_dir=tmp_path / "run" / "tokens" / "tokenizer")  # what the tokenizer stage trained
    recipe = parse_recipe({"name": "c", "sources": [{"path": "x.jsonl"}], "model": {"init_from": str(source)}})
    with pytest.raises(TokenmillError, match="set tokenizer.path"):
        Runner(recipe, tmp_path / "run", progress=False).model_config()
