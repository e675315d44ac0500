"""Was this text in the training data? Min-K% Prob membership scores and how well they separate.

Min-K% Prob (Shi et al. 2023, "Detecting Pretraining Data from Large Language Models") looks only at
the k% least likely tokens of a text: a memorised text has few surprising tokens, while an unseen one
usually has some, even when its average loss is low. Two baselines sit beside it: the perplexity of the
text (mean token loss) and the zlib ratio of Carlini et al. 2021 (mean loss over the zlib-compressed
size), which discounts texts that are merely easy (repetitive) rather than remembered.

Every score is oriented so that higher means "more likely a member"; the report gives the ROC AUC and
the true-positive rate at 5% false positives of each method on texts known to be in and out.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata

from tokenmill import TokenmillError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class MembershipConfig(BaseModel):
    """How membership inference scores texts (Min-K% Prob beside perplexity and zlib baselines)."""

    model_config = ConfigDict(extra="forbid")

    k: float = Field(0.2, gt=0.0, le=1.0, description="Share of each text's least likely tokens that Min-K% "
                                                      "Prob averages (the paper's default is 0.2).")
    max_tokens: int = Field(512, ge=1, description="Score only the first this many tokens of each text.")
    batch_size: int = Field(8, ge=1, description="Texts per forward pass.")


def membership_scores(
    logits_fn: LogitsFn,
    tokenizer,
    texts: list[str],
    *,
    max_tokens: int = 512,
    batch_size: int = 8,
    k: float = 0.2,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Scores ``{method: array[len(texts)]}`` of each text, higher meaning more likely seen in training.

    Each text is scored as ``[eos] + encode(text)`` cut to its first ``max_tokens`` text tokens (the
    eos stands for the document boundary seen in training). ``min_k_prob`` is the mean log-probability
    of the ``max(1, floor(k · n))`` least likely of its ``n`` tokens (as in the paper's code),
    ``perplexity`` the negated mean token loss, ``zlib`` the negated mean loss (nats) per byte of the
    zlib-compressed scored text. ``logits_fn`` runs under ``torch.inference_mode``; a module should be
    in eval mode.
    """
    if not 0 < k <= 1:
        raise TokenmillError(f"membership_scores: k is the share of tokens kept, in (0, 1]; got {k}")
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise TokenmillError(f"membership_scores: {name} must be at least 1, got {value}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise TokenmillError("membership_scores: the tokenizer has no eos_token_id; set its eos_token")
    encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    token_ids = [ids[:max_tokens] for ids in encoded]
    empty = [i for i, ids in enumerate(token_ids) if not ids]
    if empty:
        raise TokenmillError(f"membership_scores: text #{empty[0]} (and {len(empty) - 1} more) encodes to no "
                             f"tokens; drop empty texts before scoring")

    logprobs = _token_logprobs(logits_fn, token_ids, tokenizer.eos_token_id, batch_size, torch.device(device))
    lengths = np.array([len(ids) for ids in token_ids])
    mean_logprob = np.nansum(logprobs, axis=1) / lengths
    scored_bytes = [tokenizer.decode(ids).encode("utf-8") for ids in token_ids]
    zlib_bytes = np.array([len(zlib.compress(b)) for b in scored_bytes])
    return {
        "min_k_prob": _mean_of_lowest(logprobs, lengths, k),
        "perplexity": mean_logprob,
        "zlib": mean_logprob / zlib_bytes,
    }


def membership_report(
    members: list[str],
    nonmembers: list[str],
    logits_fn: LogitsFn,
    tokenizer,
    *,
    max_tokens: int = 512,
    batch_size: int = 8,
    k: float = 0.2,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """``{method: {"auc", "tpr_at_5fpr"}}`` of telling ``members`` (seen in training) from ``nonmembers``.

    A text in both lists has no true label, so any overlap is refused rather than silently scored.
    """
    if not members or not nonmembers:
        raise TokenmillError(f"membership_report: need texts on both sides, got {len(members)} member(s) and "
                             f"{len(nonmembers)} non-member(s)")
    shared = set(members) & set(nonmembers)
    if shared:
        example = next(iter(shared))[:60]
        raise TokenmillError(f"membership_report: {len(shared)} text(s) are both members and non-members "
                             f"(e.g. {example!r}); a text cannot be both, so remove them from one list")
    scores = membership_scores(logits_fn, tokenizer, [*members, *nonmembers], max_tokens=max_tokens,
                               batch_size=batch_size, k=k, device=device)
    is_member = np.arange(len(members) + len(nonmembers)) < len(members)
    return {
        method: {"auc": roc_auc(s[is_member], s[~is_member]),
                 "tpr_at_5fpr": tpr_at_fpr(s[is_member], s[~is_member])}
        for method, s in scores.items()
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann–Whitney U, mid-ranks)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, max_fpr: float = 0.05) -> float:
    """Share of positives flagged at the most permissive threshold (``score >= t``) flagging at most
    ``max_fpr`` of the negatives: the ROC point with the largest FPR not above ``max_fpr``."""
    thresholds = np.unique(np.concatenate([positive, negative]))
    negative, positive = np.sort(negative), np.sort(positive)
    fpr = (len(negative) - np.searchsorted(negative, thresholds, side="left")) / len(negative)
    tpr = (len(positive) - np.searchsorted(positive, thresholds, side="left")) / len(positive)
    allowed = fpr <= max_fpr
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def _token_logprobs(
    logits_fn: LogitsFn, token_ids: list[list[int]], eos: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """``[n_texts, max_len]`` log-probability of each text token given ``[eos]`` and the tokens before
    it; NaN past a text's end. Texts are batched longest first so each batch pads little."""
    width = max(len(ids) for ids in token_ids)
    out = np.full((len(token_ids), width), np.nan)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = len(token_ids[rows[0]])
            inputs = torch.full((len(rows), longest + 1), eos, dtype=torch.long)
            for r, i in enumerate(rows):
                inputs[r, 1 : len(token_ids[i]) + 1] = torch.tensor(token_ids[i])
            inputs = inputs.to(device)
            logits = logits_fn(inputs[:, :-1])
            logits = getattr(logits, "logits", logits)  # a Hugging Face model passed directly
            logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, inputs[:, 1:, None]).squeeze(-1)
            logprobs = logprobs.double().cpu().numpy()
            for r, i in enumerate(rows):
                out[i, : len(token_ids[i])] = logprobs[r, : len(token_ids[i])]
    return out


def _mean_of_lowest(logprobs: np.ndarray, lengths: np.ndarray, k: float) -> np.ndarray:
    """Mean of the ``max(1, floor(k · n))`` smallest of each row's first ``n`` (NaN padding sorts last)."""
    ascending = np.sort(logprobs, axis=1)
    n_lowest = np.maximum(1, np.floor(k * lengths)).astype(np.int64)
    cumulative = np.nancumsum(ascending, axis=1)
    return cumulative[np.arange(len(lengths)), n_lowest - 1] / n_lowest
