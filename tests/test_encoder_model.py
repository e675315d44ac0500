"""The encoders: bidirectional attention, the MLM loss, ELECTRA's generator and discriminator, FLOPs, and the
ModernBERT export (logits equal to Hugging Face's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.encoder import Electra, Encoder, MaskedLM
from tokenmill.model.hf_encoder import export_encoder
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.tokens.tokenizer import train_tokenizer

VOCAB, EOS = 300, 0
TEXTS = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n",
         "In the beginning was the word, and the word was with the mill."]


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "eos_id": EOS,
                          "max_seq_len": 256, "objective": "mlm", **overrides})


def chosen(x: torch.Tensor, every: int = 4) -> torch.Tensor:
    """Labels: the original token at every ``every``-th position, -1 elsewhere."""
    labels = torch.full_like(x, -1)
    labels[:, ::every] = x[:, ::every]
    return labels


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """A plain run tokenizer (EOS only) and one with an encoder's special tokens added."""
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 10, vocab_size=VOCAB - 4, out_dir=root / "plain")
    special = train_tokenizer(TEXTS * 10, vocab_size=VOCAB - 4, out_dir=root / "special")
    special.add_special_tokens({"pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<cls>",
                                "sep_token": "<sep>"})
    special.save_pretrained(root / "special")
    assert len(special) <= VOCAB and special.eos_token_id == EOS
    return {"plain": root / "plain", "special": root / "special"}


def test_encoder_attends_both_ways_unlike_the_decoder():
    torch.manual_seed(0)
    cfg = tiny()
    encoder, decoder = Encoder(cfg).eval(), Llama(cfg).eval()
    x = torch.randint(0, VOCAB, (2, 24))
    later = x.clone()
    later[:, -1] = (x[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert encoder(x).shape == (2, 24, 64)
        assert not torch.allclose(encoder(x)[:, 0], encoder(later)[:, 0])
        torch.testing.assert_close(decoder(x)[:, 0], decoder(later)[:, 0])


def test_masked_lm_loss_counts_only_labelled_tokens():
    torch.manual_seed(0)
    model = MaskedLM(tiny())
    x = torch.randint(0, VOCAB, (3, 20))
    labels = chosen(x)
    logits, loss = model(x, labels)
    assert logits.shape == (3, 20, 320)
    keep = labels >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep].float(), labels[keep]))
    _, per_token = model(x, labels, reduction="none")
    assert per_token.shape == (3, 20) and torch.all(per_token[~keep] == 0) and torch.all(per_token[keep] > 0)
    torch.testing.assert_close(per_token.sum() / keep.sum(), loss)
    assert model(x)[1] is None
    # the decoder is the token table, with a bias of its own
    assert model.decoder.weight is model.encoder.embeddings.tok_embeddings.weight and model.decoder.bias is not None


def test_electra_replaces_exactly_where_the_samples_differ():
    """A generator that always draws token 7: the discriminator's targets are 1 exactly at the chosen
    positions whose original token is not 7, and unchosen positions keep their input."""
    torch.manual_seed(0)
    model = Electra(tiny(objective="electra"))
    with torch.no_grad():
        model.generator.decoder.bias.fill_(-1e4)
        model.generator.decoder.bias[7] = 1e4
    x = torch.randint(8, VOCAB, (2, 16))
    labels = chosen(x)
    labels[:, ::8] = 7  # half the chosen positions had the token the generator draws
    masked_input = torch.where(labels >= 0, torch.full_like(x, 3), x)  # 3 plays <mask>
    out = model(masked_input, labels, sample_seed=torch.Generator().manual_seed(0))

    replaced = torch.where(labels >= 0, 7, x)
    targets = ((labels >= 0) & (labels != 7)).float()
    assert 0 < targets.sum() < (labels >= 0).sum()
    with torch.no_grad():
        logits = model.rtd_logits(replaced)
    rtd = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    torch.testing.assert_close(out["rtd_loss"], rtd.mean())
    torch.testing.assert_close(out["rtd_accuracy"], ((logits > 0).float() == targets).float().mean())
    assert out["per_sequence"].shape == (2,)
    torch.testing.assert_close(out["loss"], out["per_sequence"].mean())
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + 50.0 * out["rtd_loss"])


def test_electra_pad_positions_are_left_out_of_the_replaced_token_loss():
    torch.manual_seed(0)
    x = torch.randint(8, VOCAB, (2, 16))
    x[:, 12:] = 5  # padding
    labels = chosen(x)
    labels[:, 12:] = -1
    padded = Electra(tiny(objective="electra"), pad_id=5)
    full = Electra(tiny(objective="electra"))
    full.load_state_dict(padded.state_dict())
    seed = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a, b = padded(x, labels, sample_seed=seed()), full(x, labels, sample_seed=seed())
    torch.testing.assert_close(a["mlm_loss"], b["mlm_loss"])
    assert not torch.allclose(a["rtd_loss"], b["rtd_loss"])


def test_electra_is_deterministic_given_the_generator_and_shares_the_embedding():
    torch.manual_seed(0)
    model = Electra(tiny(objective="electra"))
    x = torch.randint(0, VOCAB, (2, 32))
    labels = chosen(x, every=3)
    runs = [model(x, labels, sample_seed=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    for key in ("loss", "rtd_loss", "rtd_accuracy", "per_sequence"):
        torch.testing.assert_close(runs[0][key], runs[1][key], atol=0, rtol=0)
    assert not torch.equal(runs[0]["per_sequence"], runs[2]["per_sequence"])

    table = model.discriminator.embeddings.tok_embeddings.weight
    assert model.generator.encoder.embeddings.tok_embeddings.weight is table
    assert model.generator.decoder.weight is table
    gen_dim = model.generator.encoder.cfg.dim
    assert gen_dim == 16 and model.generator.encoder.cfg.head_dim % 2 == 0
    assert model.generator.encoder.embeddings.proj.weight.shape == (gen_dim, 64)
    assert model.generator.out_proj.weight.shape == (64, gen_dim)
    assert len(model.layers) == 4

    runs[0]["loss"].backward()
    for part in (model.generator.encoder.layers, model.discriminator.layers, model.rtd_classifier):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert table.grad.abs().sum() > 0


def test_electra_discriminator_loss_does_not_reach_the_generator():
    """No gradient flows through sampling (the paper): the replaced-token loss trains the discriminator
    and the shared table only."""
    torch.manual_seed(0)
    model = Electra(tiny(objective="electra"))
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, chosen(x), sample_seed=torch.Generator().manual_seed(0))["rtd_loss"].backward()
    assert all(p.grad is None for p in model.generator.encoder.layers.parameters())
    assert model.discriminator.embeddings.tok_embeddings.weight.grad.abs().sum() > 0


def test_parallelize_wraps_every_encoder_block_in_place():
    from tokenmill.train.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    for model in (MaskedLM(tiny()), Electra(tiny(objective="electra"))):
        keys = list(model.state_dict())
        x = torch.randint(0, VOCAB, (2, 16))
        apply_activation_checkpointing(model, "full", 1)
        assert all(type(block).__name__ == "CheckpointWrapper" for block in model.layers)
        assert list(model.state_dict()) == keys
        loss = model(x, chosen(x))[1] if isinstance(model, MaskedLM) else model(x, chosen(x))["loss"]
        loss.backward()


def test_flops_per_token_is_six_n_plus_attention():
    cfg = tiny()
    mlm = MaskedLM(cfg)
    n = mlm.num_params(exclude_embedding=True)
    assert n == mlm.num_params()  # the tied table is the decoder's matrix
    assert mlm.flops_per_token(8) == 6 * n + 12 * 2 * 64 * 8
    assert 1 < mlm.flops_per_token(8) / (6 * n) < 1.02  # attention is small at short windows

    electra = Electra(tiny(objective="electra"))
    gen = electra.generator
    table = electra.discriminator.embeddings.tok_embeddings.weight.numel()
    decoder_side = table + sum(p.numel() for m in (gen.head, gen.out_proj) for p in m.parameters()) + 320
    # every parameter once, the table as a lookup only for the discriminator, the generator's head at 15%
    expected = 6 * (electra.num_params() - decoder_side + 0.15 * decoder_side) + 12 * 2 * (64 + 16) * 8
    assert electra.flops_per_token(8) == pytest.approx(expected)


@pytest.mark.parametrize("which", ["special", "plain"])
def test_masked_lm_export_matches_hugging_face(tmp_path, tokenizers, which):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = tiny(init_std=0.2)  # large weights: RoPE base, window or GELU flavour, if wrong, show far above atol
    model = MaskedLM(cfg).eval()
    with torch.no_grad():  # a trained model's norms and bias are not at their init
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    export_encoder(model, cfg, tokenizers[which], tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    assert all(kind == "full_attention" for kind in hf.config.layer_types)
    assert all(layer.attn.sliding_window is None for layer in hf.model.layers)
    x = torch.randint(0, VOCAB, (2, 160))  # past HF's default local window (128): global attention really is
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)
        encoder = AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
        torch.testing.assert_close(encoder(x).last_hidden_state, model.encoder(x), atol=1e-4, rtol=1e-4)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert config["vocab_size"] == 320 and config["eos_token_id"] == EOS
    assert config["global_rope_theta"] == config["local_rope_theta"] == cfg.rope_theta
    assert tokenizer.model_max_length == cfg.max_seq_len and tokenizer("the fox")["input_ids"]
    roles = ("pad", "mask", "cls", "sep")
    if which == "special":
        for role in roles:
            assert config[f"{role}_token_id"] == tokenizer.convert_tokens_to_ids(f"<{role}>") == getattr(
                tokenizer, f"{role}_token_id")
    else:
        assert all(config.get(f"{role}_token_id") is None for role in roles)
        assert tokenizer.pad_token_id == EOS


def test_electra_export_is_the_discriminator(tmp_path, tokenizers):
    from transformers import AutoModel, AutoModelForTokenClassification

    torch.manual_seed(0)
    cfg = tiny(objective="electra", init_std=0.2)
    model = Electra(cfg).eval()
    with torch.no_grad():
        model.rtd_classifier.bias.fill_(0.3)
    export_encoder(model, cfg, tokenizers["special"], tmp_path / "hf")
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "ModernBertForTokenClassification" and hf.config.num_labels == 1
    x = torch.randint(0, VOCAB, (2, 160))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.squeeze(-1), model.rtd_logits(x), atol=1e-4, rtol=1e-4)
        encoder = AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
        assert type(encoder).__name__ == "ModernBertModel"
        torch.testing.assert_close(encoder(x).last_hidden_state, model.discriminator(x), atol=1e-4, rtol=1e-4)
