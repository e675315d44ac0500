"""Bits per byte per domain, Paloma-style.

Loss per token depends on the tokenizer; loss per UTF-8 byte does not, so bits per byte compares models
and recipes with different vocabularies. For each domain the bits are pooled before dividing:
``bpb = -Σ log₂ p(token) / Σ bytes`` over all its documents, so long documents weigh by their length.

Each document is scored on its own as ``[eos] + encode(text)``: the ``eos`` stands for the document
boundary the model saw in training, and every text token is predicted exactly once. A document longer
than ``seq_len`` is scored in sliding windows of ``seq_len`` tokens moved by ``stride = seq_len // 2``:
the first window scores all its tokens, each later one scores only its last ``stride`` tokens, so every
token after the first window is predicted with at least ``seq_len - stride`` tokens of context.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill import TokenmillError

Model = torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]


def bits_per_byte(
    model: Model,
    tokenizer,
    docs: pa.Table,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_docs_per_domain: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Score ``docs`` (columns ``text``, ``domain``) with ``model(idx) -> logits [B, T, V]``.

    Returns ``{"domains": {d: stats}, "overall": stats, "macro_bpb": float}`` where ``stats`` holds
    ``bpb``, ``docs``, ``bytes``, ``tokens`` (text tokens scored) and ``nll_bits``. ``macro_bpb`` is the
    unweighted mean over domains, so a small domain counts as much as a large one. Empty documents carry
    nothing to score and are skipped; the first ``max_docs_per_domain`` documents of each domain (in
    table order) are kept.

    ``progress``: True draws a passing bar over the windows; False prints a start and a finish line
    (logs without a terminal); None, for library calls and the training loop (which prints its own
    line), says nothing.
    """
    _check_arguments(tokenizer, docs, seq_len, batch_size, max_docs_per_domain)
    t0 = time.perf_counter()
    docs = _nonempty_docs(docs, max_docs_per_domain)
    if progress is False:
        print(f"bpb: scoring {docs.num_rows:,} documents with seq_len {seq_len}", flush=True)
    texts = docs.column("text").to_pylist()
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    eos = tokenizer.eos_token_id
    token_ids = [np.array([eos, *ids], dtype=np.int64) for ids in encoded]

    nll_bits = _score_documents(model, token_ids, seq_len, batch_size, torch.device(device), pad_id=eos,
                                progress=progress is True)
    doc_bytes = pc.binary_length(docs.column("text")).to_numpy().astype(np.int64)
    doc_tokens = np.array([len(ids) for ids in encoded], dtype=np.int64)
    domains = np.array(docs.column("domain").to_pylist(), dtype=object)

    per_domain = {
        d: _stats(nll_bits[domains == d], doc_bytes[domains == d], doc_tokens[domains == d])
        for d in sorted(set(domains))
    }
    overall = _stats(nll_bits, doc_bytes, doc_tokens)
    if progress is False:
        print(f"bpb: {overall['bpb']:.4f} over {overall['docs']:,} documents ({overall['bytes']:,} bytes, "
              f"{overall['tokens']:,} tokens) in {time.perf_counter() - t0:.1f}s", flush=True)
    return {
        "domains": per_domain,
        "overall": overall,
        "macro_bpb": float(np.mean([s["bpb"] for s in per_domain.values()])),
    }


def _check_arguments(tokenizer, docs: pa.Table, seq_len: int, batch_size: int, max_docs: int | None) -> None:
    missing = {"text", "domain"} - set(docs.column_names)
    if missing:
        raise TokenmillError(f"bits_per_byte: the documents table lacks column(s) {sorted(missing)}; "
                             f"it has {docs.column_names}")
    if docs.num_rows == 0:
        raise TokenmillError("bits_per_byte: the documents table is empty; pass at least one document to score")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_docs_per_domain", max_docs)):
        if value is not None and value < 1:
            raise TokenmillError(f"bits_per_byte: {name} must be at least 1, got {value}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise TokenmillError("bits_per_byte: the tokenizer has no eos_token_id; set its eos_token")


def _nonempty_docs(docs: pa.Table, max_docs_per_domain: int | None) -> pa.Table:
    docs = docs.filter(pc.greater(pc.binary_length(docs.column("text")), 0))
    if docs.num_rows == 0:
        raise TokenmillError("bits_per_byte: every document in the table has empty text; nothing to score")
    if max_docs_per_domain is None:
        return docs
    domains = docs.column("domain").to_numpy(zero_copy_only=False)
    _, inverse = np.unique(domains, return_inverse=True)
    rank_in_domain = np.empty(len(domains), dtype=np.int64)
    for d in range(inverse.max() + 1):
        members = np.flatnonzero(inverse == d)
        rank_in_domain[members] = np.arange(len(members))
    return docs.filter(pa.array(rank_in_domain < max_docs_per_domain))


def _windows(n_targets: int, seq_len: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over a document of ``n_targets + 1`` tokens.

    A window feeds tokens ``[begin, end)`` and predicts tokens ``[begin + 1, end]``; it scores the
    predictions of tokens ``first_scored..end``, those no earlier window scored.
    """
    stride = max(1, seq_len // 2)
    windows, scored_to, begin = [], 0, 0
    while scored_to < n_targets:
        end = min(begin + seq_len, n_targets)
        windows.append((begin, end, scored_to + 1))
        scored_to, begin = end, begin + stride
    return windows


def _score_documents(
    model: Model, token_ids: list[np.ndarray], seq_len: int, batch_size: int, device: torch.device, pad_id: int,
    progress: bool,
) -> np.ndarray:
    """Total negative log₂-likelihood of each document's text tokens, windows batched longest first."""
    windows = [(doc, *w) for doc, ids in enumerate(token_ids) for w in _windows(len(ids) - 1, seq_len)]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # stable: ties keep document order
    nll_bits = np.zeros(len(token_ids), dtype=np.float64)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(windows), desc="bpb", unit="window", leave=False,
                                          disable=not progress) as bar:
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                inputs, targets = _batch_tensors(batch, token_ids, pad_id)
                bits = _window_bits(model, inputs.to(device), targets.to(device))
                np.add.at(nll_bits, [w[0] for w in batch], bits)
                bar.update(len(batch))
    finally:
        if was_training:
            model.train()
    return nll_bits


def _batch_tensors(batch: list[tuple[int, int, int, int]], token_ids: list[np.ndarray], pad_id: int):
    """Right-padded inputs and targets; targets not scored in a window (and padding) are -100."""
    width = max(end - begin for _, begin, end, _ in batch)
    inputs = np.full((len(batch), width), pad_id, dtype=np.int64)
    targets = np.full((len(batch), width), -100, dtype=np.int64)
    for row, (doc, begin, end, first_scored) in enumerate(batch):
        ids = token_ids[doc]
        inputs[row, : end - begin] = ids[begin:end]
        skip = first_scored - (begin + 1)
        targets[row, skip : end - begin] = ids[first_scored : end + 1]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def _window_bits(model: Model, inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Sum of −log₂ p(target) per row, from an fp32 log-softmax over the scored positions only."""
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # a Hugging Face model passed directly
    if logits.shape[:2] != inputs.shape:
        raise TokenmillError(f"bits_per_byte: the model returned shape {tuple(logits.shape)} for input "
                             f"{tuple(inputs.shape)}; it must return logits [batch, time, vocab]")
    scored = targets != -100
    nll = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    per_position = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
    per_position[scored] = nll.double()
    return (per_position.sum(dim=1) / math.log(2)).cpu().numpy()


def _stats(nll_bits: np.ndarray, doc_bytes: np.ndarray, doc_tokens: np.ndarray) -> dict:
    total_bits, total_bytes = float(nll_bits.sum()), int(doc_bytes.sum())
    return {
        "bpb": total_bits / total_bytes,
        "docs": int(len(doc_bytes)),
        "bytes": total_bytes,
        "tokens": int(doc_tokens.sum()),
        "nll_bits": total_bits,
    }
