"""The span-corruption encoder-decoder: attention directions, padding, loss, T5 buckets, HF export, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tokenmill.model.encoder_decoder import EncoderDecoder, relative_position_bucket, shift_right
from tokenmill.model.hf_seq2seq import export_seq2seq
from tokenmill.model.llama import ModelConfig
from tokenmill.tokens.tokenizer import train_tokenizer

VOCAB = 300
SENTINELS = [f"<extra_id_{i}>" for i in range(3)]
TEXT = "the quick brown fox jumps over the lazy dog"


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "objective": "span_corruption",
                          **overrides})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The test-suite tokenizer (as tests/test_train.py) plus a pad token and three sentinels."""
    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([TEXT, "a stitch in time saves nine"] * 20, vocab_size=VOCAB - 8, out_dir=out)
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": SENTINELS})
    tok.save_pretrained(out)
    assert len(tok) <= VOCAB
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def model_and_pad(seed: int = 0, **overrides) -> tuple[EncoderDecoder, int]:
    torch.manual_seed(seed)
    pad = VOCAB - 1
    return EncoderDecoder(tiny(**overrides), pad_id=pad).eval(), pad


def test_encoder_is_bidirectional_and_decoder_causal():
    model, pad = model_and_pad()
    enc_ids = torch.randint(0, VOCAB - 1, (2, 12))
    targets = torch.randint(0, VOCAB - 1, (2, 9))
    with torch.no_grad():
        enc, _ = model.encode(enc_ids)
        changed = enc_ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % (VOCAB - 1)
        enc2, _ = model.encode(changed)
        # the last input token reaches the first position: the encoder looks both ways
        assert (enc2[:, 0] - enc[:, 0]).abs().max() > 1e-4
        logits, _ = model(enc_ids, targets)
        t = 4
        later = targets.clone()
        later[:, t] = (later[:, t] + 1) % (VOCAB - 1)
        logits2, _ = model(enc_ids, later)
    # target t is the decoder input at t + 1: positions up to t cannot see it, those after do
    torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=0, rtol=0)
    assert (logits2[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4


def test_padding_keys_are_ignored():
    """A padded input gives the unpadded input's outputs at its real positions, and a padded row in a
    batch leaves the other rows as they are alone."""
    model, pad = model_and_pad()
    ids = torch.randint(0, VOCAB - 1, (1, 7))
    targets = torch.randint(0, VOCAB - 1, (1, 5))
    padded = torch.cat([ids, torch.full((1, 4), pad)], dim=1)
    with torch.no_grad():
        enc, _ = model.encode(ids)
        enc_padded, _ = model.encode(padded)
        torch.testing.assert_close(enc_padded[:, :7], enc, atol=1e-5, rtol=1e-5)
        logits, _ = model(ids, targets)
        logits_padded, _ = model(padded, targets)
        torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=1e-5)
        all_pad = torch.full((1, 11), pad)  # no key to attend: finite, not NaN
        batch_logits, _ = model(torch.cat([padded, all_pad]), targets.repeat(2, 1))
    assert torch.isfinite(batch_logits).all()
    torch.testing.assert_close(batch_logits[:1], logits, atol=1e-5, rtol=1e-5)


def test_loss_ignores_minus_one_targets_and_decoder_starts_from_pad():
    model, pad = model_and_pad()
    enc_ids = torch.randint(0, VOCAB - 1, (2, 10))
    targets = torch.randint(0, VOCAB - 1, (2, 6))
    targets[0, 4:] = -1
    targets[1, 2] = -1
    assert shift_right(targets, pad).tolist()[0] == [pad, *targets[0, :4].tolist(), pad]
    with torch.no_grad():
        logits, loss = model(enc_ids, targets)
        _, per_token = model(enc_ids, targets, reduction="none")
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(loss, expected)
    assert per_token.shape == targets.shape and (per_token[~keep] == 0).all()
    torch.testing.assert_close(per_token.sum() / keep.sum(), loss)


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-400, 401)
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional)
        theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                        max_distance=128)
        assert torch.equal(ours, theirs), bidirectional


def test_layers_params_and_flops_follow_the_shape():
    model, _ = model_and_pad()
    cfg = model.cfg
    assert len(model.layers) == 2 * cfg.n_layers
    d, f, L, V = cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.padded_vocab_size
    enc_block, dec_block = 4 * d * d + 3 * d * f + 2 * d, 8 * d * d + 3 * d * f + 3 * d
    body = L * (enc_block + dec_block) + 2 * d
    assert model.num_params(exclude_embedding=True) == body + d * V
    assert model.num_params() == body + 2 * d * V + 2 * 32 * cfg.n_heads
    flops = model.flops_per_example(64, 16)
    per_input = L * enc_block + d + L * 2 * d * d  # encoder, its final norm, cross-attention's k and v
    per_target = L * (dec_block - 2 * d * d) + d + d * V
    assert per_input + per_target == model.num_params(exclude_embedding=True)
    matmuls = 6 * per_input * 64 + 6 * per_target * 16
    assert flops == matmuls + 12 * L * d * (64 * 64 + 16 * 16 + 16 * 64)
    assert model.flops_per_token(64, 16) == flops / 64
    assert model.expected_target_len(100) == 15 + 5 + 1  # T5: 15 noise tokens, 5 spans of 3, EOS
    assert model.flops_per_token(100) == model.flops_per_example(100, 21) / 100


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_as_seq2seq_with_matching_logits(tmp_path, tokenizer_dir, tok, tie):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    pad, eos = tok.pad_token_id, tok.eos_token_id
    cfg = tiny(tie_embeddings=tie)
    torch.manual_seed(0)
    model = EncoderDecoder(cfg, pad_id=pad).eval()
    export_seq2seq(model, cfg, tokenizer_dir, tmp_path / "hf", pad_id=pad, eos_id=eos)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == cfg.padded_vocab_size == 320 and config["tie_word_embeddings"] is tie
    assert config["decoder_start_token_id"] == pad and config["feed_forward_proj"] == "gated-silu"
    hf, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    hf.eval()
    enc_ids = torch.randint(0, VOCAB - 8, (2, 20))
    enc_ids[1, 14:] = pad
    targets = torch.randint(0, VOCAB - 8, (2, 9))
    targets[1, 6:] = -1
    with torch.no_grad():
        ours, _ = model(enc_ids, targets)
        theirs = hf(input_ids=enc_ids, attention_mask=(enc_ids != pad).long(),
                    decoder_input_ids=shift_right(targets, pad)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert exported.pad_token_id == pad and exported.eos_token_id == eos
    assert exported(TEXT)["input_ids"]


def test_few_steps_learn_a_corrupted_example(tok):
    """T5-style: the input keeps the text around sentinel-marked gaps, the target spells out the gaps."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    s0, s1, s2 = tok.convert_tokens_to_ids(SENTINELS)
    words = [tok.encode(" " + w if i else w) for i, w in enumerate(TEXT.split())]
    flat = lambda parts: [t for p in parts for t in p]  # noqa: E731
    enc = flat(words[:2]) + [s0] + flat(words[3:6]) + [s1] + flat(words[8:]) + [eos]
    tgt = [s0] + flat(words[2:3]) + [s1] + flat(words[6:8]) + [s2, eos]
    enc_ids = torch.tensor([enc + [pad] * 3])
    targets = torch.tensor([tgt + [-1] * 2])
    torch.manual_seed(0)
    model = EncoderDecoder(tiny(), pad_id=pad)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(enc_ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(VOCAB) and losses[-1] < 0.2 * losses[0], losses
    assert model.encoder_position_bias.weight.grad.abs().sum() > 0
    assert model.decoder_position_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode, selective", [("full", 1), ("selective", "op")])
def test_parallelize_checkpoints_every_block_of_both_stacks(mode, selective):
    """train/parallelize.py wraps each element of ``layers`` in place; the forward must run the wrapped
    blocks (encoder and decoder) and give the same loss and gradients."""
    import copy

    from tokenmill.train.parallelize import apply_activation_checkpointing

    model, pad = model_and_pad()
    enc_ids, targets = torch.randint(0, VOCAB - 1, (2, 12)), torch.randint(0, VOCAB - 1, (2, 5))
    _, loss = model(enc_ids, targets)
    loss.backward()
    wrapped = copy.deepcopy(model)
    wrapped.zero_grad()
    apply_activation_checkpointing(wrapped, mode, selective)
    assert all(type(block).__name__ == "CheckpointWrapper" for block in wrapped.layers)
    _, loss2 = wrapped(enc_ids, targets)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in wrapped.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)
