"""Masking and span corruption at load time, the special tokens each objective needs, and the recipe's
checks of what cannot fit."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.recipe import parse_recipe
from tokenmill.run import Runner
from tokenmill.tokens.corruption import (
    SPECIAL,
    Denoiser,
    MaskingConfig,
    SpanCorruptionConfig,
    corruption_shapes,
    mask_tokens,
    raw_length,
    required_tokens,
    sentinel,
    span_corrupt,
)
from tokenmill.tokens.tokenizer import (
    EOS_TOKEN,
    TokenizerConfig,
    add_special,
    load_tokenizer,
    prepare_tokenizer,
    train_tokenizer,
)

from conftest import DEMO_DATA

EOS, PAD, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000
SPECIAL_IDS = np.array([EOS, PAD, CLS, SEP])


class Model:
    """The fields of ModelConfig that corruption_shapes reads."""

    def __init__(self, span: SpanCorruptionConfig, max_seq_len: int = 4096):
        self.span_corruption, self.max_seq_len = span, max_seq_len


def random_tokens(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Ordinary tokens with EOS and pad sprinkled in, as a packed stream has EOS between documents."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, VOCAB, (rows, width))
    tokens[rng.random((rows, width)) < 0.05] = EOS
    tokens[rng.random((rows, width)) < 0.02] = PAD
    return tokens


# ---- masking ---------------------------------------------------------------------------------------


def test_masking_matches_the_config_and_never_picks_special_tokens():
    tokens = random_tokens(2000, 128)
    cfg = MaskingConfig()
    inputs, labels = mask_tokens(tokens, np.arange(2000), cfg, seed=3, mask_id=MASK, vocab_size=VOCAB,
                                 special_ids=SPECIAL_IDS)
    assert inputs.shape == labels.shape == tokens.shape and inputs.dtype == labels.dtype == np.int64
    chosen = labels >= 0
    special = np.isin(tokens, SPECIAL_IDS)
    assert not (chosen & special).any() and (inputs[special] == tokens[special]).all()
    assert (labels[chosen] == tokens[chosen]).all() and (inputs[~chosen] == tokens[~chosen]).all()
    eligible = (~special).sum(1)
    assert np.abs(chosen.sum(1) - cfg.mask_rate * eligible).max() < 1  # exact counts, stochastically rounded
    assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.002)
    masked = chosen & (inputs == MASK)
    swapped = chosen & (inputs != MASK) & (inputs != tokens)
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.01)
    assert swapped.sum() / chosen.sum() == pytest.approx(0.1 * (1 - 1 / (VOCAB - 5)), abs=0.01)
    assert not np.isin(inputs[swapped], [*SPECIAL_IDS, MASK]).any() and inputs[swapped].max() < VOCAB
    assert len(np.unique(inputs[swapped])) > 0.9 * (VOCAB - 10)  # spread over the whole vocabulary

    modern = MaskingConfig(mask_rate=0.3, mask_fraction=1.0, random_fraction=0.0)
    inputs, labels = mask_tokens(tokens, np.arange(2000), modern, seed=3, mask_id=MASK, vocab_size=VOCAB,
                                 special_ids=SPECIAL_IDS)
    assert (labels >= 0).sum() / eligible.sum() == pytest.approx(0.3, abs=0.002)
    assert (inputs[labels >= 0] == MASK).all()


def test_masking_depends_on_the_sequence_index_only():
    tokens = random_tokens(6, 64, seed=1)
    kw = dict(seed=7, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS)
    a_in, a_lab = mask_tokens(tokens, np.array([10, 11, 12, 13, 14, 15]), MaskingConfig(), **kw)
    order = [4, 0, 2]  # another batch: other rows, another order, another size
    b_in, b_lab = mask_tokens(tokens[order], np.array([14, 10, 12]), MaskingConfig(), **kw)
    assert (b_in == a_in[order]).all() and (b_lab == a_lab[order]).all()
    same = np.repeat(tokens[:1], 2, axis=0)
    c_in, _ = mask_tokens(same, np.array([10, 99]), MaskingConfig(), **kw)
    assert (c_in[0] == a_in[0]).all() and (c_in[1] != c_in[0]).any()
    d_in, _ = mask_tokens(tokens, np.arange(10, 16), MaskingConfig(), **{**kw, "seed": 8})
    assert (d_in != a_in).any()


# ---- span corruption -------------------------------------------------------------------------------

SENTINELS = list(range(900, 1000))  # <extra_id_i> = 900 + i, as they sit above the text tokens
MODES = {"[NLU]": 880, "[NLG]": 881, "[S2S]": 882}
TEXT_VOCAB = 800


def corrupt(cfg: SpanCorruptionConfig, seq_len: int, rows: int, seed: int = 0, target_len: int | None = None):
    shapes = corruption_shapes("span_corruption", Model(cfg), seq_len)
    window = np.random.default_rng(seed).integers(10, TEXT_VOCAB, (rows, shapes.raw_len))
    inputs, targets = span_corrupt(window, np.arange(rows), cfg, seed=seed, sentinel_ids=SENTINELS, mode_ids=MODES,
                                   pad_id=PAD, eos_id=EOS, input_len=shapes.input_len,
                                   target_len=target_len or shapes.target_len)
    return shapes, window, inputs, targets


def decode(inputs: np.ndarray, targets: np.ndarray) -> tuple[str | None, list[int], list[list[int]], list[int]]:
    """One row back to (mode token, the window it used, its noise spans, its kept prefix for a prefix
    denoiser): the input's sentinels are filled with the target's sentinel-delimited spans, in order."""
    body = list(inputs)
    mode = next((m for m, i in MODES.items() if body[0] == i), None)
    body = body[1:] if mode else body
    assert EOS in body, "the input ends with EOS"
    body = body[:body.index(EOS)]
    assert all(t == PAD for t in inputs[len(body) + (2 if mode else 1):])
    out = [int(t) for t in targets if t != -1]
    assert out[-1] == EOS and all(t == -1 for t in targets[len(out):])
    out = out[:-1]
    sentinels = set(SENTINELS)
    if not any(t in sentinels for t in body):  # prefix denoiser: the target continues the input
        return mode, body + out, [], body
    spans: list[list[int]] = []
    for t in out:
        if t in sentinels:
            spans.append([])
        else:
            spans[-1].append(t)
    window, k = [], 0
    for t in body:
        if t in sentinels:
            assert t == SENTINELS[k % len(SENTINELS)] and out.count(t) >= 1
            window += spans[k]
            k += 1
        else:
            window.append(t)
    assert k == len(spans), "one sentinel in the input per span of the target"
    return mode, window, spans, []


def test_raw_length_is_t5s():
    assert raw_length(512, 0.15, 3) == (568, 114)  # T5's published example

    def t5(inputs_length, noise_density, mean_noise_span_length):  # t5.data.preprocessors, verbatim logic
        def lengths(tokens_length):
            num_noise_tokens = int(round(tokens_length * noise_density))
            num_nonnoise_tokens = tokens_length - num_noise_tokens
            num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
            return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

        tokens_length = inputs_length - 1
        while lengths(tokens_length + 1)[0] <= inputs_length:
            tokens_length += 1
        inputs_length, targets_length = lengths(tokens_length)
        if noise_density == 0.5 and targets_length > inputs_length:
            tokens_length -= 1
            targets_length -= 1
        return tokens_length, targets_length

    for args in [(512, 0.15, 3), (256, 0.15, 3), (1024, 0.15, 3), (512, 0.5, 3), (512, 0.5, 8), (128, 0.15, 8),
                 (626, 0.15, 3)]:
        assert raw_length(*args) == t5(*args), args


def test_t5_span_corruption_reconstructs_the_window():
    cfg = SpanCorruptionConfig()
    shapes, window, inputs, targets = corrupt(cfg, 512, 300)
    assert shapes == (568, 512, 114, (568,))
    assert inputs.shape == (300, 512) and targets.shape == (300, 114)
    noise, lengths = [], []
    for row in range(300):
        mode, used, spans, _ = decode(inputs[row], targets[row])
        assert mode is None and used == window[row].tolist()
        # exact counts: round(568 * 0.15) = 85 noise tokens in round(85 / 3) = 28 spans; nothing truncated
        assert sum(map(len, spans)) == 85 and len(spans) == 28 and min(map(len, spans)) >= 1
        assert inputs[row, 0] < TEXT_VOCAB  # the window starts with a kept token, as T5's
        assert (inputs[row] == EOS).sum() == 1 and inputs[row, -1] == EOS  # 568 - 85 + 28 + 1 = 512
        noise.append(sum(map(len, spans)) / len(used))
        lengths += map(len, spans)
    assert np.mean(noise) == pytest.approx(0.15, abs=0.005)
    assert np.mean(lengths) == pytest.approx(3, abs=0.05) and np.std(lengths) > 1  # random, not fixed, lengths
    again = corrupt(cfg, 512, 300)
    assert (again[2] == inputs).all() and (again[3] == targets).all()
    shuffled = span_corrupt(window[[5, 2]], np.array([5, 2]), cfg, seed=0, sentinel_ids=SENTINELS, mode_ids=MODES,
                            pad_id=PAD, eos_id=EOS, input_len=512, target_len=114)
    assert (shuffled[0] == inputs[[5, 2]]).all() and (shuffled[1] == targets[[5, 2]]).all()


def test_ul2_mixes_denoisers_by_rate_with_mode_tokens():
    cfg = SpanCorruptionConfig(preset="ul2")
    rows = 2400
    shapes, window, inputs, targets = corrupt(cfg, 256, rows)
    assert inputs.shape == (rows, 256) and targets.shape == (rows, shapes.target_len)
    assert shapes.raw_len == max(shapes.denoiser_raw) and len(shapes.denoiser_raw) == 7
    modes, prefix_rows = [], 0
    for row in range(rows):
        mode, used, spans, kept = decode(inputs[row], targets[row])
        modes.append(mode)
        assert used == window[row, :len(used)].tolist() and len(used) in shapes.denoiser_raw
        if mode == "[S2S]":
            prefix_rows += 1
            assert not spans and len(used) - len(kept) == round(len(used) * 0.25)  # the last quarter is the target
        else:
            assert spans and mode in ("[NLU]", "[NLG]")
    share = {m: modes.count(m) / rows for m in MODES}
    # rates: R (mu 3, 8) -> [NLU]; X (4 of them) -> [NLG]; S (rate 2) -> [S2S]; 8 in all
    assert share == pytest.approx({"[NLU]": 2 / 8, "[NLG]": 4 / 8, "[S2S]": 2 / 8}, abs=0.03)
    assert prefix_rows > 0


def test_denoisers_use_the_window_that_fits_a_shorter_target():
    cfg = SpanCorruptionConfig(preset=None, target_len=20, denoisers=[
        Denoiser(kind="span", mean_span_length=2, noise_density=0.5),
        Denoiser(kind="prefix", noise_density=0.5, mode_token="[S2S]")])
    shapes = corruption_shapes("span_corruption", Model(cfg), 64)
    assert shapes.target_len == 20 and shapes.input_len == 64
    # 0.5 density, mu 2: L - L/2 + L/4 + 1 <= 64 would take ~84 tokens, but the target (L/2 + L/4 + 1) caps it
    _, window, inputs, targets = corrupt(cfg, 64, 200)
    assert targets.shape == (200, 20) and inputs.shape == (200, 64)
    for row in range(200):
        mode, used, _, kept = decode(inputs[row], targets[row])
        assert used == window[row, :len(used)].tolist()
        assert len(used) == shapes.denoiser_raw[1 if mode else 0]
    assert (targets[:, -1] == EOS).any()  # some rows fill the target exactly


def test_spans_and_targets_that_cannot_fit_are_refused():
    long_spans = SpanCorruptionConfig(preset=None, denoisers=[Denoiser(mean_span_length=64, noise_density=0.15)])
    with pytest.raises(TokenmillError, match=r"denoisers.0, span mean_span_length=64 .*do not fit.* train.seq_len"):
        corruption_shapes("span_corruption", Model(long_spans), 128)
    assert corruption_shapes("span_corruption", Model(long_spans), 512).raw_len > 512
    with pytest.raises(TokenmillError, match="model.max_seq_len=256"):
        corruption_shapes("span_corruption", Model(SpanCorruptionConfig(target_len=300), 256), 256)
    with pytest.raises(TokenmillError, match="cannot hold"):
        corruption_shapes("span_corruption", Model(SpanCorruptionConfig()), 2)
    assert corruption_shapes("mlm", Model(SpanCorruptionConfig()), 128)[:3] == (128, 128, 128)
    assert corruption_shapes("clm", Model(SpanCorruptionConfig()), 128)[:3] == (129, 128, 128)


# ---- special tokens and the tokenizer --------------------------------------------------------------


def test_required_tokens_per_objective():
    assert required_tokens("clm", None) == []
    assert required_tokens("mlm", None) == required_tokens("electra", None) == ["<mask>", "<cls>", "<sep>", "<pad>"]
    t5 = required_tokens("span_corruption", None)
    assert t5 == ["<pad>", *(sentinel(i) for i in range(100))] and sentinel(7) == "<extra_id_7>"
    ul2 = required_tokens("span_corruption", SpanCorruptionConfig(preset="ul2", sentinels=10))
    assert ul2 == ["<pad>", *(sentinel(i) for i in range(10)), "[NLU]", "[NLG]", "[S2S]"]
    with pytest.raises(TokenmillError, match="not one of"):
        required_tokens("gpt", None)


TEXTS = ["the quick brown fox jumps over the lazy dog", "kalo mine suta ripo defa guxi"] * 30


def test_trained_tokenizer_gains_the_objectives_tokens_after_its_own(tmp_path):
    clm = train_tokenizer(TEXTS, 300, tmp_path / "clm")
    train_tokenizer(TEXTS, 300, tmp_path / "clm2", extra_special=[])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a clm tokenizer is what it always was
        assert filecmp.cmp(tmp_path / "clm" / name, tmp_path / "clm2" / name, shallow=False)
    assert "<mask>" not in json.loads((tmp_path / "clm" / "tokenizer.json").read_text())["model"]["vocab"]

    prepare_tokenizer(TokenizerConfig(vocab_size=300), iter(TEXTS), tmp_path / "mlm",
                      extra_special=required_tokens("mlm", None))
    mlm = load_tokenizer(tmp_path / "mlm")
    assert mlm.eos_token_id == clm.eos_token_id == 0 and mlm.eos_token == EOS_TOKEN
    ids = mlm.convert_tokens_to_ids(list(SPECIAL.values()))
    assert ids == list(range(len(clm), len(clm) + 4)) and len(mlm) == len(clm) + 4
    assert (mlm.mask_token, mlm.cls_token, mlm.sep_token, mlm.pad_token) == ("<mask>", "<cls>", "<sep>", "<pad>")
    text = "the lazy fox kalo"
    assert mlm(text, add_special_tokens=False).input_ids == clm(text, add_special_tokens=False).input_ids


def test_loaded_tokenizer_gains_missing_tokens_unless_frozen(tmp_path):
    train_tokenizer(TEXTS, 300, tmp_path / "mine")
    base = len(load_tokenizer(tmp_path / "mine"))
    span = required_tokens("span_corruption", SpanCorruptionConfig(preset="ul2"))
    cfg = TokenizerConfig(path=str(tmp_path / "mine"))
    prepare_tokenizer(cfg, iter(()), tmp_path / "run", extra_special=span)
    run = load_tokenizer(tmp_path / "run")
    assert len(run) == base + len(span) == base + 104 and run.pad_token == "<pad>" and run.eos_token_id == 0
    assert run.convert_tokens_to_ids(["<extra_id_0>", "[S2S]"]) == [base + 1, base + 103]
    again = prepare_tokenizer(TokenizerConfig(path=str(tmp_path / "run")), iter(()), tmp_path / "again",
                              extra_special=span)
    assert len(again) == len(run)  # it has them: nothing added
    assert add_special(again, span, origin="x", frozen_by="model.init_from=ckpt") == []  # nothing to add, fine
    with pytest.raises(TokenmillError, match=r"model.init_from=/ckpt .*embedding"):
        prepare_tokenizer(cfg, iter(()), tmp_path / "frozen", extra_special=span, frozen_by="model.init_from=/ckpt")


def test_added_tokens_may_not_push_uint16_shards_to_uint32():
    vocab = {EOS_TOKEN: 0, **{f"w{i}": i + 1 for i in range(65533)}}  # 65,534 ids: two to spare
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                  eos_token=EOS_TOKEN)
    with pytest.raises(TokenmillError, match=r"65,538 ids, past the 65,536 of uint16 .*vocab_size to 65,532"):
        add_special(tok, required_tokens("mlm", None), origin="tokenizer.vocab_size=65534")
    assert add_special(tok, ["<mask>", "<pad>"], origin="tokenizer.path=x") == ["<mask>", "<pad>"]
    assert len(tok) == 65536


# ---- the recipe and the run ------------------------------------------------------------------------


def recipe(**model) -> dict:
    return {"name": "enc", "sources": [{"path": str(DEMO_DATA / "bible.jsonl.gz"), "domain": "bible"}],
            "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128, **model},
            "train": {"seq_len": 128, "micro_batch_size": 2, "global_batch_tokens": 256}}


@pytest.mark.parametrize("train, match", [
    ({"doc_mask": True}, "train.doc_mask applies to the causal decoder"),
    ({"metadata": {"field": "domain"}}, "train.metadata applies to the causal decoder"),
])
def test_recipe_refuses_decoder_only_training_options(train, match):
    data = recipe(objective="mlm")
    data["train"].update(train)
    with pytest.raises(TokenmillError, match=match):
        parse_recipe(data)
    parse_recipe({**data, "model": recipe()["model"]})  # fine for clm


def test_recipe_refuses_spans_and_targets_that_do_not_fit():
    ul2 = recipe(objective="span_corruption", span_corruption={"preset": "ul2"})
    ul2_x = r"model.span_corruption \(preset ul2, denoiser 4\).*mean_span_length=64.*train.seq_len"
    with pytest.raises(TokenmillError, match=ul2_x):
        parse_recipe(ul2)
    longer = recipe(objective="span_corruption", span_corruption={"target_len": 256})
    with pytest.raises(TokenmillError, match=r"target_len <= 128"):
        parse_recipe(longer)
    shapes = corruption_shapes("span_corruption", parse_recipe(recipe(objective="span_corruption")).model, 128)
    assert shapes.input_len == 128 and shapes.raw_len > 128  # the raw window is not the model's to hold


def test_tokenizer_fingerprint_names_extra_tokens_only_when_there_are_some(tmp_path):
    def tokenizer_inputs(data):
        return dict(Runner(parse_recipe(data), tmp_path / "run", progress=False).stage_inputs())["tokenizer"]

    clm = tokenizer_inputs(recipe())
    assert list(clm) == ["tokenizer"]  # as before objectives existed: decoder run folders keep their fingerprint
    mlm = tokenizer_inputs(recipe(objective="mlm"))
    assert mlm == {**clm, "tokenizer.extra_special": ["<mask>", "<cls>", "<sep>", "<pad>"]}
