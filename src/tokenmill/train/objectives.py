"""Each pretraining objective as one loss per sequence, made from the loader's windows.

The loader cuts the same token windows for every objective (``window_len`` tokens per sequence, as
``x`` and its shift ``y``); an objective turns a micro-batch of windows into its model's inputs — the
window itself (clm), a BERT-masked copy (mlm, electra) or a span-corrupted input and target (T5/UL2) —
deterministically from the run's seed and each window's global sequence index ``g``, and returns each
sequence's loss, so the loop's per-domain losses, DoReMi and loss-based weighting apply to all alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from tokenmill import TokenmillError
from tokenmill.model.llama import ModelConfig
from tokenmill.tokens.corruption import SPECIAL, corruption_shapes, mask_tokens, sentinel, span_corrupt
from tokenmill.train.config import TrainConfig

# Validation windows get global sequence indices far above any training run's, so their masks and
# corruptions are fixed for the whole run and never those of a training sequence.
EVAL_G_OFFSET = 1 << 48


class Objective(Protocol):
    window_len: int  # tokens cut per sequence: the loader's seq_len + 1

    def losses(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: np.ndarray,
               device: torch.device, doc_mask: bool) -> torch.Tensor:
        """Each sequence's loss [B] for windows ``x`` and ``y`` (on the CPU) of global indices ``g``."""


class CausalLM:
    """Next-token loss of the decoder, averaged over the targets that count (not -1: MeCo's prefixes)."""

    def __init__(self, seq_len: int):
        self.window_len = seq_len + 1

    def losses(self, model, x, y, g, device, doc_mask):
        y = y.to(device, non_blocking=True)
        _, token_loss = model(x.to(device, non_blocking=True), y, doc_mask=doc_mask, reduction="none")
        return token_loss.sum(dim=1) / (y >= 0).sum(dim=1).clamp(min=1)


class Masked:
    """MLM (the masked tokens' mean loss) or ELECTRA (generator MLM + weighted replaced-token detection)
    on windows of ``seq_len`` tokens masked as ``model.masking`` says. ELECTRA's training micro-batches
    leave their parts in ``parts`` (generator MLM loss, replaced-token loss and accuracy), which the loop
    logs beside the combined loss."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, tokenizer):
        self.window_len = cfg.seq_len
        self.electra = model_cfg.objective == "electra"
        self.masking, self.seed = model_cfg.masking, cfg.seed
        self.mask_id = _token_id(tokenizer, SPECIAL["mask"])
        self.vocab_size = len(tokenizer)
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), np.int64)

    def losses(self, model, x, y, g, device, doc_mask):
        window = torch.cat([x, y[:, -1:]], dim=1).numpy()
        inputs, labels = mask_tokens(window, g, self.masking, seed=self.seed, mask_id=self.mask_id,
                                     vocab_size=self.vocab_size, special_ids=self.special_ids)
        inputs, labels = (torch.from_numpy(a).to(device, non_blocking=True) for a in (inputs, labels))
        if self.electra:
            sampling = torch.Generator(device=device).manual_seed(int(self.seed * 1_000_003 + int(g[0])))
            out = model(inputs, labels, sample_seed=sampling)
            if torch.is_grad_enabled():  # training: the loop logs the parts beside the combined loss
                self.parts = {name: out[name] for name in ("mlm_loss", "rtd_loss", "rtd_accuracy")}
            return out["per_sequence"]
        _, token_loss = model(inputs, labels, reduction="none")
        return token_loss.sum(dim=1) / (labels >= 0).sum(dim=1).clamp(min=1)


class SpanCorruption:
    """T5 span corruption or UL2's mixture of denoisers: the decoder's mean loss over each target."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, tokenizer):
        self.shapes = corruption_shapes("span_corruption", model_cfg, cfg.seq_len)
        self.window_len = self.shapes.raw_len
        self.cfg, self.seed = model_cfg.span_corruption, cfg.seed
        self.sentinel_ids = [_token_id(tokenizer, sentinel(i)) for i in range(self.cfg.sentinels)]
        self.mode_ids = {d.mode_token: _token_id(tokenizer, d.mode_token) for d in self.cfg.resolved() if d.mode_token}
        self.pad_id, self.eos_id = _token_id(tokenizer, SPECIAL["pad"]), tokenizer.eos_token_id

    def losses(self, model, x, y, g, device, doc_mask):
        window = torch.cat([x, y[:, -1:]], dim=1).numpy()
        enc, targets = span_corrupt(window, g, self.cfg, seed=self.seed, sentinel_ids=self.sentinel_ids,
                                    mode_ids=self.mode_ids, pad_id=self.pad_id, eos_id=self.eos_id,
                                    input_len=self.shapes.input_len, target_len=self.shapes.target_len)
        enc, targets = (torch.from_numpy(a).to(device, non_blocking=True) for a in (enc, targets))
        _, token_loss = model(enc, targets, reduction="none")
        return token_loss.sum(dim=1) / (targets >= 0).sum(dim=1).clamp(min=1)


def build_objective(model_cfg: ModelConfig, cfg: TrainConfig, tokenizer) -> Objective:
    """``tokenizer`` (the run's, with the objective's special tokens) is needed by every objective but clm."""
    if model_cfg.objective == "clm":
        return CausalLM(cfg.seq_len)
    if tokenizer is None:
        raise TokenmillError(f"objective {model_cfg.objective} needs the run's tokenizer (tokenizer_dir) for its "
                             "special tokens")
    if model_cfg.objective in ("mlm", "electra"):
        return Masked(model_cfg, cfg, tokenizer)
    return SpanCorruption(model_cfg, cfg, tokenizer)


def _token_id(tokenizer, token: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise TokenmillError(f"the tokenizer has no {token!r}, which this objective needs; the tokenizer stage adds "
                             "it (rerun it), or use a tokenizer that has it")
    return vocab[token]
