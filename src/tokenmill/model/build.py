"""The network each objective trains: the decoder for clm, an encoder for mlm, ELECTRA's pair of encoders,
or an encoder-decoder for span corruption. Everything that builds a model from a config comes here."""

from __future__ import annotations

from torch import nn

from tokenmill.model.llama import Llama, ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.objective == "clm":
        return Llama(cfg)
    if cfg.objective == "mlm":
        from tokenmill.model.encoder import MaskedLM

        return MaskedLM(cfg)
    if cfg.objective == "electra":
        from tokenmill.model.encoder import Electra

        return Electra(cfg)
    from tokenmill.model.encoder_decoder import EncoderDecoder

    if cfg.pad_id is None:
        raise ValueError("span_corruption needs model.pad_id (the run sets it from the tokenizer's <pad>)")
    return EncoderDecoder(cfg, pad_id=cfg.pad_id)
