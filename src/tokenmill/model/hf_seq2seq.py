"""Hugging Face export of the encoder-decoder: a ``T5ForConditionalGeneration`` folder.

``EncoderDecoder`` has T5 v1.1's arithmetic (see its module docstring), so the export is a table of key
renames: block i of ``layers`` is ``encoder.block.i`` for i < n_layers, ``decoder.block.(i - n_layers)``
after; the position-bias tables go to block 0 of their stack, where T5 keeps them. The vocabulary stays
padded (logits over the padded rows, as the decoder's export), and the tokenizer files are copied with
the pad and EOS tokens named, so ``AutoModelForSeq2SeqLM`` and ``AutoTokenizer`` load it offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill import TokenmillError
from tokenmill.model.encoder_decoder import MAX_DISTANCE, NUM_BUCKETS, EncoderDecoder
from tokenmill.model.hf import WEIGHTS, copy_tokenizer, dense_state
from tokenmill.model.llama import ModelConfig

# Inside a block: our sub-module name -> T5's, per stack. T5 numbers the sub-layers of a block:
# 0 self-attention, (decoder) 1 cross-attention, last the feed-forward, each with its own layer_norm.
_ENCODER_BLOCK = {
    "input_layernorm": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
    "post_attention_layernorm": "layer.1.layer_norm", "mlp": "layer.1.DenseReluDense",
}
_DECODER_BLOCK = {
    "input_layernorm": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
    "cross_attn_layernorm": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
    "post_attention_layernorm": "layer.2.layer_norm", "mlp": "layer.2.DenseReluDense",
}
_LEAF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
         "gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo", "weight": "weight"}
_TOP = {
    "embed_tokens.weight": "shared.weight",
    "encoder_position_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder_position_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder_norm.weight": "encoder.final_layer_norm.weight",
    "decoder_norm.weight": "decoder.final_layer_norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_seq2seq_key(name: str, n_layers: int) -> str:
    """T5ForConditionalGeneration's name for our parameter ``name``."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(?:(\w+)\.)?weight", name)
    if m is None:
        raise TokenmillError(f"no Hugging Face T5 name for encoder-decoder parameter {name!r}")
    i, sub, leaf = int(m[1]), m[2], m[3] or "weight"
    stack, table, j = ("encoder", _ENCODER_BLOCK, i) if i < n_layers else ("decoder", _DECODER_BLOCK, i - n_layers)
    suffix = "weight" if leaf == "weight" else f"{_LEAF[leaf]}.weight"
    return f"{stack}.block.{j}.{table[sub]}.{suffix}"


def export_seq2seq(model: EncoderDecoder, cfg: ModelConfig, tokenizer_dir: Path, out: Path, *,
                   pad_id: int, eos_id: int) -> None:
    """Write ``out`` loadable by ``AutoModelForSeq2SeqLM.from_pretrained`` offline: config.json,
    generation_config.json, model.safetensors (fp32, padded vocabulary) and the tokenizer files.

    config.json says ``tie_word_embeddings: false`` as T5 v1.1's own configs do: transformers reads it
    as "no dim**-0.5 rescale of the decoder output" (transformers 5 then still ties by default, but
    keeps the head apart when the checkpoint holds a different one, with a warning; transformers 4
    unties). Generation starts the decoder from ``pad_id`` and stops at ``eos_id``.
    """
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, T5Config

    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenmillError(f"{tokenizer_dir} has no tokenizer.json: pass the run's tokens/tokenizer folder")
    for name, token_id in (("pad_id", pad_id), ("eos_id", eos_id)):
        if not 0 <= token_id < cfg.padded_vocab_size:
            raise TokenmillError(f"export: {name}={token_id} is outside the model's {cfg.padded_vocab_size} rows")
    out.mkdir(parents=True, exist_ok=True)
    hf_config = T5Config(
        vocab_size=cfg.padded_vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.head_dim,
        d_ff=cfg.ffn_hidden,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=NUM_BUCKETS,
        relative_attention_max_distance=MAX_DISTANCE,
        dropout_rate=0.0,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj="gated-silu",
        tie_word_embeddings=cfg.tie_embeddings,
        is_encoder_decoder=True,
        decoder_start_token_id=pad_id,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    hf_config.architectures = ["T5ForConditionalGeneration"]
    hf_config.save_pretrained(out)
    # transformers 5 writes tie_word_embeddings: true whatever it was given (and keeps the meaning in
    # scale_decoder_outputs); the key is what transformers 4 and other readers go by, so write ours.
    config_path = out / "config.json"
    written = json.loads(config_path.read_text())
    written.update(tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings)
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    GenerationConfig(decoder_start_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)

    n = cfg.n_layers
    state = {
        hf_seq2seq_key(k, n): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in dense_state(model).items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    names = {name: backend.id_to_token(token_id) for name, token_id in (("pad", pad_id), ("eos", eos_id))}
    missing = [name for name, token in names.items() if token is None]
    if missing:
        raise TokenmillError(f"export: {tokenizer_dir / 'tokenizer.json'} has no token for "
                             f"{', '.join(f'{m}_id' for m in missing)}: export with the run's own tokenizer")
    copy_tokenizer(tokenizer_dir, out, {"eos_token": names["eos"], "pad_token": names["pad"]}, cfg.max_seq_len)
