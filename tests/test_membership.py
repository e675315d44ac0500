"""Membership inference: a model that memorised some texts tells them apart; the arithmetic; bad input."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from conftest import demo_docs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.evaluate.membership import membership_report, membership_scores, roc_auc, tpr_at_fpr

EOS = "<|endoftext|>"


def verses(n: int) -> list[str]:
    """Real text: the first ``n`` verses of the bundled Bible chapters, at most three per chapter."""
    found = []
    for doc in demo_docs("bible"):
        found += re.findall(r"^ *\d+ (.+)$", doc["text"], flags=re.M)[:3]
    return found[:n]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(verses(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def memorise(model: LlamaForCausalLM, tokenizer, texts: list[str], steps: int) -> None:
    """Train on ``[eos] + text`` of every text at once until the model has them by heart."""
    ids = [[tokenizer.eos_token_id, *tokenizer.encode(t)] for t in texts]
    width = max(map(len, ids))
    inputs = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=inputs, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def logits_fn(model):
    return lambda idx: model(input_ids=idx).logits


def test_memorised_texts_are_told_apart(tokenizer):
    texts = verses(32)
    members, nonmembers = texts[0::2], texts[1::2]
    model = tiny_llama(len(tokenizer))
    memorise(model, tokenizer, members, steps=40)

    report = membership_report(members, nonmembers, logits_fn(model), tokenizer, max_tokens=64, batch_size=8)

    assert set(report) == {"min_k_prob", "perplexity", "zlib"}
    for method, figures in report.items():
        assert figures["auc"] > 0.8, (method, figures)
        assert 0.0 <= figures["tpr_at_5fpr"] <= 1.0
    assert report["min_k_prob"]["tpr_at_5fpr"] > 0.3


def test_scores_match_a_direct_computation(tokenizer):
    texts = verses(5)
    model = tiny_llama(len(tokenizer))
    k, max_tokens = 0.3, 40

    scores = membership_scores(logits_fn(model), tokenizer, texts, max_tokens=max_tokens, batch_size=2, k=k)

    for i, text in enumerate(texts):
        ids = [tokenizer.eos_token_id, *tokenizer.encode(text)[:max_tokens]]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        token_logprobs = logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
        n_lowest = max(1, int(k * len(token_logprobs)))
        assert scores["min_k_prob"][i] == pytest.approx(np.sort(token_logprobs)[:n_lowest].mean(), abs=1e-5)
        assert scores["perplexity"][i] == pytest.approx(token_logprobs.mean(), abs=1e-5)
    assert np.all(scores["min_k_prob"] <= scores["perplexity"])


def test_auc_and_tpr_agree_with_pairwise_definitions():
    rng = np.random.default_rng(0)
    positive = rng.integers(0, 6, size=40).astype(float) + 1.0  # many ties, shifted up
    negative = rng.integers(0, 6, size=50).astype(float)

    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(positive, negative)]
    assert roc_auc(positive, negative) == pytest.approx(np.mean(pairs))

    best = max((np.mean(positive >= t) for t in np.concatenate([positive, negative, [np.inf]])
                if np.mean(negative >= t) <= 0.05), default=0.0)
    assert tpr_at_fpr(positive, negative) == pytest.approx(best)
    assert roc_auc(positive, positive.copy()) == pytest.approx(0.5)


def test_refuses_empty_or_overlapping_sets(tokenizer):
    model = tiny_llama(len(tokenizer))
    texts = verses(4)
    with pytest.raises(TokenmillError, match="both sides"):
        membership_report([], texts, logits_fn(model), tokenizer)
    with pytest.raises(TokenmillError, match="both members and non-members"):
        membership_report(texts, texts, logits_fn(model), tokenizer)
    with pytest.raises(TokenmillError, match="no tokens"):
        membership_scores(logits_fn(model), tokenizer, [texts[0], ""])
