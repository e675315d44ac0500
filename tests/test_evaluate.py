"""Bits per byte: the arithmetic against hand computations, windowing, batching and input errors."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.model.bpb import bits_per_byte

TEXTS = {
    "verse": [
        "In the beginning was the word, and the word was with the light.",
        "And the evening and the morning were the first day of the week.",
        "Blessed are the meek: for they shall inherit the earth and all its ways, " * 3,
    ],
    "code": [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)  # squares — café\n",
    ],
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the test texts, so no file or download is needed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([t for texts in TEXTS.values() for t in texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def docs_table(texts: dict[str, list[str]] = TEXTS) -> pa.Table:
    rows = [(text, domain) for domain, items in texts.items() for text in items]
    return pa.table({"text": [t for t, _ in rows], "domain": [d for _, d in rows]})


class UniformModel(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


class BigramModel(torch.nn.Module):
    """Logits depend only on the current token, so any window with one token of context scores alike."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


class PrefixMeanModel(torch.nn.Module):
    """Logits from the mean embedding of the whole prefix: every earlier token changes the prediction."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, idx.shape[1] + 1, device=idx.device).unsqueeze(-1)
        return self.head(self.embed(idx).cumsum(dim=1) / steps)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_uniform_model_costs_log2_vocab_bits_per_token(tokenizer):
    vocab = len(tokenizer)
    result = bits_per_byte(UniformModel(vocab), tokenizer, docs_table(), seq_len=16, batch_size=3)
    for domain, texts in TEXTS.items():
        tokens = sum(len(encode(tokenizer, t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        stats = result["domains"][domain]
        assert (stats["tokens"], stats["bytes"], stats["docs"]) == (tokens, n_bytes, len(texts))
        assert stats["bpb"] == pytest.approx(tokens * math.log2(vocab) / n_bytes, rel=1e-6)


def test_domain_pooling_matches_a_manual_computation(tokenizer):
    model = BigramModel(len(tokenizer))
    result = bits_per_byte(model, tokenizer, docs_table(), seq_len=512)
    totals = {}
    for domain, texts in TEXTS.items():
        bits = 0.0
        for text in texts:
            ids = torch.tensor([tokenizer.eos_token_id, *encode(tokenizer, text)])
            logp = torch.log_softmax(model(ids[None, :-1])[0].float(), dim=-1)
            bits -= logp[torch.arange(len(ids) - 1), ids[1:]].sum().item() / math.log(2)
        totals[domain] = (bits, sum(len(t.encode("utf-8")) for t in texts))
        assert result["domains"][domain]["bpb"] == pytest.approx(bits / totals[domain][1], rel=1e-5)
    all_bits, all_bytes = map(sum, zip(*totals.values()))
    assert result["overall"]["bpb"] == pytest.approx(all_bits / all_bytes, rel=1e-5)
    assert result["overall"]["nll_bits"] == pytest.approx(all_bits, rel=1e-5)
    assert result["macro_bpb"] == pytest.approx(sum(b / n for b, n in totals.values()) / len(totals), rel=1e-5)


def test_windows_score_every_token_exactly_once(tokenizer):
    """A bigram model sees the same previous token in any window, so windowing must not change its score."""
    model = BigramModel(len(tokenizer))
    longest = max(len(encode(tokenizer, t)) for texts in TEXTS.values() for t in texts)
    whole = bits_per_byte(model, tokenizer, docs_table(), seq_len=longest + 1)
    for seq_len in (1, 2, 7, longest // 3):
        windowed = bits_per_byte(model, tokenizer, docs_table(), seq_len=seq_len, batch_size=5)
        assert windowed["overall"]["tokens"] == whole["overall"]["tokens"]
        assert windowed["overall"]["nll_bits"] == pytest.approx(whole["overall"]["nll_bits"], rel=1e-5)


def test_windowing_equals_a_single_pass_when_documents_fit(tokenizer):
    model = PrefixMeanModel(len(tokenizer))
    longest = max(len(encode(tokenizer, t)) for texts in TEXTS.values() for t in texts)
    fits = bits_per_byte(model, tokenizer, docs_table(), seq_len=longest, batch_size=1)
    roomy = bits_per_byte(model, tokenizer, docs_table(), seq_len=4 * longest, batch_size=8)
    assert fits["overall"]["nll_bits"] == pytest.approx(roomy["overall"]["nll_bits"], rel=1e-5)
    short = bits_per_byte(model, tokenizer, docs_table(), seq_len=longest // 4)
    assert short["overall"]["nll_bits"] != pytest.approx(roomy["overall"]["nll_bits"], rel=1e-5)


def test_padding_does_not_leak_into_scores(tokenizer):
    model = PrefixMeanModel(len(tokenizer))
    one = bits_per_byte(model, tokenizer, docs_table(), seq_len=24, batch_size=1)
    many = bits_per_byte(model, tokenizer, docs_table(), seq_len=24, batch_size=16)
    for domain in TEXTS:
        assert many["domains"][domain]["nll_bits"] == pytest.approx(one["domains"][domain]["nll_bits"], rel=1e-5)


def test_accepts_a_callable_and_restores_training_mode(tokenizer):
    model = BigramModel(len(tokenizer)).train()
    as_module = bits_per_byte(model, tokenizer, docs_table(), seq_len=32)
    assert model.training
    as_callable = bits_per_byte(lambda idx: model(idx), tokenizer, docs_table(), seq_len=32)
    assert as_callable == as_module


def test_max_docs_per_domain_keeps_the_first_documents(tokenizer):
    result = bits_per_byte(UniformModel(len(tokenizer)), tokenizer, docs_table(), seq_len=64, max_docs_per_domain=1)
    for domain, texts in TEXTS.items():
        assert result["domains"][domain]["docs"] == 1
        assert result["domains"][domain]["bytes"] == len(texts[0].encode("utf-8"))


def test_empty_table_and_missing_columns_are_clear_errors(tokenizer):
    model = UniformModel(len(tokenizer))
    with pytest.raises(TokenmillError, match="empty"):
        bits_per_byte(model, tokenizer, docs_table({}), seq_len=8)
    with pytest.raises(TokenmillError, match="domain"):
        bits_per_byte(model, tokenizer, pa.table({"text": ["a"]}), seq_len=8)
    with pytest.raises(TokenmillError, match="seq_len"):
        bits_per_byte(model, tokenizer, docs_table(), seq_len=0)
