"""Hugging Face interchange: export our Llama as a ``LlamaForCausalLM`` folder, import one back.

Our parameter names are HF's without the ``model.`` prefix and RoPE uses HF's ``rotate_half`` layout,
so both directions are a key rename: no weight permutation, logits match to float rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from tokenmill import TokenmillError
from tokenmill.model.llama import Llama, ModelConfig

WEIGHTS = "model.safetensors"


def _hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


@torch.no_grad()
def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every parametrized tensor (SLTrain's low-rank and sparse factors,
    applied from outside the model) replaced by the dense tensor it computes, under the plain name."""
    merged = {f"{name}.{tensor}": getattr(module, tensor) for name, module in model.named_modules()
              if parametrize.is_parametrized(module) for tensor in module.parametrizations}
    plain = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    return {**plain, **merged}


def export_hf(model: Llama, cfg: ModelConfig, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir`` loadable by ``AutoModelForCausalLM.from_pretrained`` offline: config.json,
    generation_config.json, model.safetensors (fp32, padded vocabulary) and the tokenizer files.

    The tokenizer gets EOS as its pad token and the model's context as ``model_max_length``, so batch
    padding and truncation work in ``transformers``. ``pad_token_id`` goes in generation_config.json only:
    in config.json it would become the embedding's ``padding_idx`` and freeze EOS's row in fine-tuning.
    """
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenmillError(f"{tokenizer_dir} has no tokenizer.json: pass the run's tokens/tokenizer folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = LlamaConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=cfg.eos_id,
    )
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(out_dir)
    GenerationConfig(eos_token_id=cfg.eos_id, pad_token_id=cfg.eos_id).save_pretrained(out_dir)

    state = {
        _hf_key(k): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in dense_state(model).items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    save_file(state, out_dir / WEIGHTS, metadata={"format": "pt"})

    eos = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).id_to_token(cfg.eos_id)
    copy_tokenizer(tokenizer_dir, out_dir, {"eos_token": eos, "pad_token": eos}, cfg.max_seq_len)
    return out_dir


def copy_tokenizer(tokenizer_dir: Path, out: Path, tokens: dict[str, str], model_max_length: int) -> None:
    """Copy the run's tokenizer files into an export and name its special tokens (``eos_token``,
    ``pad_token``, ...) and context length in tokenizer_config.json, so ``transformers`` pads, truncates
    and masks with the ids the model was trained with. Every export (decoder, encoder, T5) ends here."""
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    config_path = out / "tokenizer_config.json"
    config = (json.loads(config_path.read_text()) if config_path.exists()
              else {"tokenizer_class": "PreTrainedTokenizerFast"})
    config.update(tokens, model_max_length=model_max_length)
    config_path.write_text(json.dumps(config, indent=2))


def _rope_theta(hf_config) -> float:
    """RoPE base across transformers versions; scaled RoPE variants are refused, not approximated."""
    params = getattr(hf_config, "rope_parameters", None) or {
        "rope_theta": getattr(hf_config, "rope_theta", 10000.0),
        **(getattr(hf_config, "rope_scaling", None) or {}),
    }
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise TokenmillError(f"RoPE type {rope_type!r} is not supported by tokenmill's Llama (only 'default')")
    return float(params["rope_theta"])


def hf_model_config(path: Path) -> ModelConfig:
    """The ``ModelConfig`` of a local HF Llama-family checkpoint folder, refusing what our Llama lacks.
    The vocabulary is kept exactly (no padding) so logits match the source model."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise TokenmillError(f"{path} has no config.json: point at a Hugging Face model folder")
    hf = AutoConfig.from_pretrained(path)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    unsupported = {
        "attention_bias": getattr(hf, "attention_bias", False),
        "mlp_bias": getattr(hf, "mlp_bias", False),
        "hidden_act != silu": hf.hidden_act != "silu",
        "head_dim != hidden_size / num_attention_heads": head_dim * hf.num_attention_heads != hf.hidden_size,
    }
    if any(unsupported.values()):
        bad = ", ".join(k for k, v in unsupported.items() if v)
        raise TokenmillError(f"{path / 'config.json'}: {bad} not supported by tokenmill's Llama")
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
    return ModelConfig(
        vocab_size=hf.vocab_size,
        pad_vocab_to=1,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        ffn_hidden=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        rope_theta=_rope_theta(hf),
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=getattr(hf, "initializer_range", 0.02),
        eos_id=eos,
    )


def load_hf_weights(model: Llama, path: Path) -> None:
    """Copy the safetensors weights of HF checkpoint ``path`` into ``model`` (built from its config)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TokenmillError(f"{path} has no *.safetensors weights: re-save the model with safe_serialization")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state.update(load_file(f))
    missing = []
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if model.cfg.tie_embeddings and name == "lm_head.weight":
                continue
            src = hf_state.get(_hf_key(name))
            if src is None:
                missing.append(_hf_key(name))
            else:
                p.copy_(src)
    if missing:
        raise TokenmillError(f"{path}: weights missing from the safetensors files: {', '.join(missing[:5])}")


def import_hf(path: Path) -> tuple[Llama, ModelConfig]:
    """Load a local HF Llama-family checkpoint (config.json + *.safetensors) as our Llama."""
    cfg = hf_model_config(path)
    model = Llama(cfg)
    load_hf_weights(model, path)
    return model, cfg
