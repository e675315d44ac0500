"""The decoder: shapes, learning, document masking, configs, and Hugging Face export/import."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tokenmill.model import Llama, ModelConfig, export_hf, import_hf
from tokenmill.tokens.tokenizer import train_tokenizer

VOCAB = 256
EOS = 0


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "vocab_size": VOCAB, "eos_id": EOS, **overrides})


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = Llama(tiny(vocab_size=250))  # padded up to 256
    idx = torch.randint(0, 250, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 256)
    nothing, loss = model(idx, idx)
    assert nothing is None  # with targets the head's loss is fused: the logits are never materialised
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert loss.dtype == torch.float32


def test_preset_fills_shape_and_explicit_fields_override():
    cfg = ModelConfig(preset="124M", n_layers=3)
    assert (cfg.dim, cfg.n_heads, cfg.n_layers, cfg.max_seq_len, cfg.vocab_size) == (768, 12, 3, 1024, 50304)
    assert cfg.ffn_hidden == 2048 and cfg.n_kv_heads == 12
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg  # a dumped config rebuilds the same model
    with pytest.raises(ValidationError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValidationError):
        ModelConfig(preset="tiny", dims=64)


def test_param_count_and_flops_follow_the_shape():
    cfg = tiny()
    model = Llama(cfg)
    d, f, L, V = cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.padded_vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert model.num_params() == L * per_layer + d + 2 * V * d
    assert model.num_params(exclude_embedding=True) == L * per_layer + d + V * d
    assert model.flops_per_token(32) == 6 * model.num_params(True) + 12 * L * d * 32
    tied = Llama(tiny(tie_embeddings=True))
    assert tied.num_params() == tied.num_params(exclude_embedding=True) == L * per_layer + d + V * d


def test_loss_decreases_on_repeated_text():
    torch.manual_seed(0)
    model = Llama(tiny())
    pattern = torch.randint(1, VOCAB, (40,))
    data = pattern.repeat(20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_doc_mask_blocks_attention_across_documents():
    torch.manual_seed(0)
    model = Llama(tiny()).eval()
    idx = torch.randint(1, VOCAB, (1, 32))
    idx[0, 11] = EOS  # doc 1 = tokens 0..11 (EOS included), doc 2 = 12..31
    changed = idx.clone()
    changed[0, :11] = torch.randint(1, VOCAB, (11,))
    with torch.no_grad():
        a, b = model(idx, doc_mask=True), model(changed, doc_mask=True)
        a_plain, b_plain = model(idx), model(changed)
    torch.testing.assert_close(a[0, 12:], b[0, 12:])
    assert not torch.allclose(a[0, :11], b[0, :11])
    assert not torch.allclose(a_plain[0, 12:], b_plain[0, 12:])  # without the mask doc 2 sees doc 1
    torch.testing.assert_close(a[0, :12], a_plain[0, :12])  # the first document is plain causal


def _write_tokenizer(path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("tie", [False, True])
def test_export_hf_loads_in_transformers_with_matching_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    _write_tokenizer(tmp_path / "tok")
    cfg = tiny(vocab_size=300, tie_embeddings=tie)
    model = Llama(cfg).eval()
    out = export_hf(model, cfg, tmp_path / "tok", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == cfg.padded_vocab_size == 320
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("the fox")["input_ids"]


def test_export_hf_pads_batches_with_eos_within_the_model_context(tmp_path):
    """transformers can pad a batch of the export's tokenizer (pad = EOS, no new token) and truncate to the
    model's context; padding leaves the real positions' logits as they are alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300, tmp_path / "tok")  # as a run does
    vocab = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size()
    cfg = tiny(vocab_size=vocab, max_seq_len=64)
    out = export_hf(Llama(cfg).eval(), cfg, tmp_path / "tok", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()

    assert tokenizer.pad_token_id == tokenizer.eos_token_id == hf.config.eos_token_id == EOS
    assert GenerationConfig.from_pretrained(out, local_files_only=True).pad_token_id == EOS
    assert len(tokenizer) == vocab and hf.get_input_embeddings().num_embeddings == cfg.padded_vocab_size
    assert tokenizer.model_max_length == 64
    assert len(tokenizer("the fox " * 100, truncation=True)["input_ids"]) == 64
    texts = ["the quick brown fox", "the lazy dog jumps over the quick brown fox and the dog"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = hf(**batch).logits
        for row, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            assert int(batch["attention_mask"][row].sum()) == ids.shape[1]
            torch.testing.assert_close(padded[row, : ids.shape[1]], hf(ids).logits[0], atol=1e-5, rtol=1e-5)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the first row was padded


def test_import_hf_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=123, hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0, eos_token_id=7,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "src")
    model, cfg = import_hf(tmp_path / "src")
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.n_kv_heads, cfg.rope_theta, cfg.eos_id) == (123, 123, 2, 5000.0, 7)
    idx = torch.randint(0, 123, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_preset_table_in_the_docstring_matches_the_models():
    """Each documented parameter count is what the preset builds (on the meta device: no memory)."""
    from tokenmill.model import PRESETS, llama

    rows = [line.split("|")[1:-1] for line in llama.__doc__.splitlines() if line.startswith("| ") and "M" in line]
    table = {cells[0].strip(): [c.strip() for c in cells] for cells in rows if cells[0].strip() in PRESETS}
    assert set(table) == set(PRESETS)
    millions = lambda n: f"{n / 1e6:.1f}M"
    for name, (_, dim, layers, heads, ffn, body, head_8k, head_50k, _) in table.items():
        counts = []
        for vocab in (8192, 50304):
            cfg = ModelConfig(preset=name, vocab_size=vocab)
            with torch.device("meta"):
                counts.append(Llama(cfg).num_params(exclude_embedding=True))
        assert (dim, layers, heads, ffn) == (str(cfg.dim), str(cfg.n_layers), f"{cfg.n_heads}/{cfg.n_kv_heads}",
                                             str(cfg.ffn_hidden)), name
        assert [head_8k, head_50k] == [millions(n) for n in counts], name
        assert body == millions(counts[0] - 8192 * cfg.dim), name
        assert cfg.head_dim == 64 or name == "tiny"


def test_per_token_loss_reduction_matches_the_mean():
    torch.manual_seed(0)
    model = Llama(tiny())
    idx = torch.randint(0, VOCAB, (2, 16))
    targets = idx.clone()
    targets[0, :4] = -1
    _, mean = model(idx, targets)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 16) and (per_token[0, :4] == 0).all()
    torch.testing.assert_close(per_token.sum() / (targets != -1).sum(), mean)
