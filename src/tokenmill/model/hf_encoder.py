"""Hugging Face export of the encoders as ModernBERT folders.

``model/encoder.py`` is ModernBERT module for module under HF's names, so the export renames prefixes
and writes a ``ModernBertConfig`` that makes HF compute what tokenmill computes: every layer global
attention (``layer_types`` all ``full_attention``, ``global_attn_every_n_layers`` 1, a local window
wider than any input in case an older reader ignores both), RoPE base ``rope_theta`` for both of HF's
attention kinds, GELU (erf) in the GLU and the heads, no biases but the MLM decoder's and the
classifier's. A masked LM exports as ``ModernBertForMaskedLM``; ELECTRA exports its discriminator, the
model kept, as ``ModernBertForTokenClassification`` with one label (positive: replaced), whose
encoder ``AutoModel`` loads alone. ELECTRA's generator is not exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill import TokenmillError
from tokenmill.model.encoder import Electra, MaskedLM
from tokenmill.model.hf import WEIGHTS, copy_tokenizer, dense_state
from tokenmill.model.llama import ModelConfig
from tokenmill.tokens.corruption import SPECIAL


def _special_ids(tokenizer_dir: Path) -> dict[str, tuple[str, int]]:
    """``role -> (token, id)`` for each special token the tokenizer has: the one it declares for the
    role, else tokenmill's name for it. Absent roles are left out (never the unknown token's id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = tokenizer.get_vocab()
    found = {}
    for role, default in SPECIAL.items():  # mask, cls, sep, pad: each sets the config's <role>_token_id
        token = getattr(tokenizer, f"{role}_token", None) or default
        if token in vocab:
            found[role] = (token, tokenizer.convert_tokens_to_ids(token))
    return found


def _hf_state(model: MaskedLM | Electra) -> tuple[str, dict[str, torch.Tensor]]:
    """The HF architecture name and the weights under HF's keys (fp32, on the CPU). The tied decoder
    weight is left out: HF ties it to the token embedding on load."""
    if isinstance(model, Electra):
        architecture = "ModernBertForTokenClassification"
        prefixes = {"discriminator.": "model.", "rtd_head.": "head.", "rtd_classifier.": "classifier."}
    elif isinstance(model, MaskedLM):
        architecture = "ModernBertForMaskedLM"
        prefixes = {"encoder.": "model.", "head.": "head.", "decoder.bias": "decoder.bias"}
        if not isinstance(model.out_proj, torch.nn.Identity):
            raise TokenmillError("this MaskedLM reads a wider shared embedding (an ELECTRA generator): "
                                 "ModernBERT has no such projection; export the Electra model instead")
    else:
        raise TokenmillError(f"export_encoder takes a MaskedLM or an Electra, not {type(model).__name__}")
    state = {}
    for name, tensor in dense_state(model).items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            state[prefixes[prefix] + name[len(prefix):]] = tensor.detach().to("cpu", torch.float32).contiguous()
    return architecture, state


def _check_keys(architecture: str, hf_config, state: dict[str, torch.Tensor]) -> None:
    """Refuse to write a folder HF would load with missing or unused weights (it only warns, and
    initialises the missing ones at random): build the HF model on the meta device and compare."""
    import transformers

    with torch.device("meta"):
        hf_model = getattr(transformers, architecture)(hf_config)
    expected = {k for k in hf_model.state_dict() if k != "decoder.weight"}
    missing, unused = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unused:
        raise TokenmillError(f"export to {architecture} does not line up with transformers "
                             f"{transformers.__version__}: missing {missing[:5]}, unused {unused[:5]}")


def export_encoder(model: MaskedLM | Electra, cfg: ModelConfig, tokenizer_dir: Path, out: Path) -> None:
    """Write ``out`` loadable offline by ``AutoModelForMaskedLM`` (a MaskedLM) or
    ``AutoModelForTokenClassification`` (an Electra's discriminator), and by ``AutoModel`` (the encoder
    alone): config.json, model.safetensors (fp32, padded vocabulary) and the tokenizer files.

    The config carries the tokenizer's ``<pad>``, ``<mask>``, ``<cls>`` and ``<sep>`` ids where it has
    them (unset otherwise) and ``cfg.eos_id`` as EOS. ``pad_token_id`` is set only for a real pad
    token: HF makes it the embedding's ``padding_idx``, which freezes that row in fine-tuning. The
    tokenizer config gets the same special tokens, EOS as its pad token when there is no ``<pad>`` (as
    the decoder export does) and the model's context as ``model_max_length``.
    """
    from transformers import ModernBertConfig

    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenmillError(f"{tokenizer_dir} has no tokenizer.json: pass the run's tokens/tokenizer folder")
    special = _special_ids(tokenizer_dir)
    architecture, state = _hf_state(model)
    theta = cfg.rope_theta
    hf_config = ModernBertConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        hidden_activation="gelu",  # erf GELU, F.gelu's default
        classifier_activation="gelu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        norm_eps=cfg.norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        decoder_bias=True,
        classifier_bias=False,
        layer_types=["full_attention"] * cfg.n_layers,
        global_attn_every_n_layers=1,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": theta}
                         for kind in ("full_attention", "sliding_attention")},
        local_attention=4 * cfg.max_seq_len,  # HF's half-window is local_attention // 2: wider than any input
        tie_word_embeddings=True,
        pad_token_id=special.get("pad", (None, None))[1],
        bos_token_id=special.get("cls", (None, None))[1],
        eos_token_id=cfg.eos_id,
        cls_token_id=special.get("cls", (None, None))[1],
        sep_token_id=special.get("sep", (None, None))[1],
        mask_token_id=special.get("mask", (None, None))[1],
    )
    if architecture == "ModernBertForTokenClassification":
        hf_config.num_labels = 1
        hf_config.id2label, hf_config.label2id = {0: "replaced"}, {"replaced": 0}
    hf_config.architectures = [architecture]
    _check_keys(architecture, hf_config, state)

    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    # transformers 4.x reads the RoPE bases from these two fields (default global base: 160000).
    config_path = out / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "global_rope_theta": theta,
                                       "local_rope_theta": theta}, indent=2, sort_keys=True))
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})

    tokens = {f"{role}_token": token for role, (token, _) in special.items()}
    if cfg.eos_id is not None:
        from tokenizers import Tokenizer

        eos = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).id_to_token(cfg.eos_id)
        tokens = {"eos_token": eos, "pad_token": eos, **tokens}
    copy_tokenizer(tokenizer_dir, out, tokens, cfg.max_seq_len)
