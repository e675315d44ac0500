"""Training throughput: tokenmill's Llama beside HF transformers' Llama and litgpt's GPT of the same shape.

Default: the GPT-2-124M shape (12 layers x 768, 12 heads, seq 1024, vocab 50304), bf16 autocast,
torch.compile, micro-batch 16, fused AdamW (tokenmill's decay split for every contender), gradient
clipping at 1.0, as the training loop does. tokenmill's model goes through ``train.parallelize``, so
its activation checkpointing and compile are what a run uses. Each contender is built, warmed up
(compilation happens there), then timed over ``--steps`` optimizer steps between CUDA syncs; it
reports tokens/s, MFU (6N + attention FLOPs of the shape, the loop's count, against the device's bf16
peak from ``train.device.PEAK_BF16_FLOPS``) and peak memory. The batches are random tokens: throughput
does not depend on the text, so the benchmark needs no corpus.

    PYTHONPATH=src python benchmarks/train_speed.py                    # 124M: tokenmill, HF, litgpt
    PYTHONPATH=src python benchmarks/train_speed.py --preset 350M --ac none,selective,full
    PYTHONPATH=src python benchmarks/train_speed.py --preset 1B --micro-batch 8 --ac none,full
    PYTHONPATH=src python benchmarks/train_speed.py --smoke            # CPU, tiny shape, 3 steps
    PYTHONPATH=src python benchmarks/train_speed.py --doc-mask --peers ""   # tokenmill with train.doc_mask

``--doc-mask`` measures tokenmill as a run with ``train.doc_mask: true`` trains it: the model has an
``eos_id`` and the batches end a document about four times per row. On CUDA the documents are masked by
FlexAttention with a block mask built once per step, which skips the fully masked blocks, so the figure
depends on the document lengths (``--smoke`` on CPU uses the dense mask with SDPA). The peers have no
document masking; with ``--doc-mask`` they are still measured unmasked.

On a CPU (``--device cpu``, or no CUDA) the decoder is measured as the CPU runs of the trainer take it:
eager, fp32 (``--cpu-dtype bfloat16`` puts every contender under bf16 autocast), at the shape the CPU
trains (dim 256, 4 layers, 4 heads, seq 256, micro-batch 8, vocab 8192), in the interleaved rounds the
encoder path uses. Beside HF Llama and litgpt's GPT of the same shape stand two GPT-2-architecture peers
at the same matmul FLOPs (a GELU MLP of 1.5× the SwiGLU width): transformers' ``GPT2LMHeadModel`` with
SDPA and litgpt's GPT in the GPT-2/Pythia layout (LayerNorm, biases, tanh GELU; RoPE, as litgpt has no
learned positions). tokenmill's step is the loop's (its objective's per-sequence losses). Bars: ≥ 1.2× the
fastest GPT-2 peer and ≥ 1.3× HF Llama. After the rounds each contender's step is profiled once more: the
seconds its matmuls and attention kernels take (``matmul_attention_s_per_step``, which no eager rewrite
shortens at equal FLOPs) and their share of the step; ``ceiling_vs_<peer>`` is the ratio tokenmill would
reach if all its other work took no time, the most any CPU optimisation at fp32 can buy.

    PYTHONPATH=src python benchmarks/train_speed.py --device cpu --steps 40 --rounds 8   # ~3 min

``--objective mlm`` measures the encoder instead: tokenmill's ``MaskedLM`` train step beside HF
``transformers.ModernBertForMaskedLM`` of the same shape, configured as ``model/hf_encoder.py`` exports
it (every layer global attention, the same RoPE theta, erf GELU, no biases but the decoder's, tied
decoder, SDPA attention), on the same batch with the same masking (BERT's 15%, 80/10/10; labels -1 off
the masked positions for tokenmill, -100 for HF). HF runs with ``sparse_prediction=False``: its decoder
then scores every position, as tokenmill's ``MaskedLM`` does (``--peers hf,hf_sparse`` adds the sparse
setting, which decodes only the masked positions, as a reference outside the bar). Both models stay
built and take turns: after their warm-up, ``--rounds`` rounds in a rotating order, each timing every
contender over ``--steps / --rounds`` steps, so drift on a shared machine hits both alike; the figure is
each contender's median over rounds. On CPU (no CUDA, or ``--device cpu``) fp32 and eager at a small
encoder shape (dim 256, 4 layers, seq 128, micro-batch 8, vocab 8192); on GPU bf16 autocast and
compile at ``--preset``. Bar: tokenmill ≥ 1.0× HF on CPU, ≥ 1.1× on GPU.

    PYTHONPATH=src python benchmarks/train_speed.py --objective mlm            # CPU: ~1 min; GPU: 124M shape
    PYTHONPATH=src python benchmarks/train_speed.py --objective mlm --smoke    # CPU, tiny shape, seconds

Prints one JSON line. litgpt is measured when importable, else noted. Its 0.5 release pins
``huggingface-hub<1.4``, which breaks the transformers tokenmill installs: ``pip install litgpt`` and then
``pip install "huggingface-hub>=1.31"`` again (its model code does not use the hub).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.train.config import TrainConfig
from tokenmill.train.device import peak_flops
from tokenmill.train.objectives import CausalLM
from tokenmill.train.optim import build_adamw
from tokenmill.train.parallelize import parallelize

Step = Callable[[torch.Tensor, torch.Tensor], None]


def _trainer(model: torch.nn.Module, loss_fn, tcfg: TrainConfig, device: torch.device, bf16: bool) -> Step:
    """One optimizer step as the loop takes it: autocast forward, backward, clip, fused AdamW."""
    optimizer = build_adamw(model, tcfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model  # for the parameter counts the output reports
    return step


def tokenmill_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool) -> Step:
    """The loop's step: its objective's per-sequence losses (``CausalLM``), their mean."""
    model = parallelize(Llama(cfg).to(device), tcfg, None, bf16=bf16)
    objective, rows = CausalLM(tcfg.seq_len), np.arange(tcfg.micro_batch_size)
    return _trainer(model, lambda x, y: objective.losses(model, x, y, rows, device, tcfg.doc_mask).mean(),
                    tcfg, device, bf16)


def hf_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool) -> Step:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).to(device).train()
    forward = torch.compile(model) if tcfg.compile else model
    return _trainer(model, lambda x, y: forward(input_ids=x, labels=x).loss, tcfg, device, bf16)


def gpt2_inner(cfg: ModelConfig) -> int:
    """The GELU MLP width whose two matmuls have the SwiGLU's three's parameters (so the same FLOPs)."""
    return 3 * cfg.ffn_hidden // 2


def hf_gpt2_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool) -> Step:
    """transformers' GPT2LMHeadModel at tokenmill's matmul FLOPs: learned positions, LayerNorm, biases, tanh
    GELU MLP of ``gpt2_inner`` width, tied head (GPT-2's), SDPA, dropout off (tokenmill has none)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.padded_vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=gpt2_inner(cfg), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 lies past a small vocab
    )
    model = GPT2LMHeadModel(hf_cfg).to(device).train()
    forward = torch.compile(model) if tcfg.compile else model
    return _trainer(model, lambda x, y: forward(input_ids=x, labels=x).loss, tcfg, device, bf16)


def litgpt_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool,
                gpt2: bool = False) -> Step:
    """litgpt's GPT in tokenmill's shape (Llama layout), or with ``gpt2`` in the GPT-2/Pythia layout at the
    same matmul FLOPs: LayerNorm, biases, tanh GELU MLP. litgpt has no learned positions: RoPE on every
    head dimension in both."""
    from litgpt.config import Config
    from litgpt.model import GPT

    layout = dict(bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", gelu_approximate="tanh",
                  intermediate_size=gpt2_inner(cfg), n_query_groups=cfg.n_heads) if gpt2 else \
        dict(bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=cfg.ffn_hidden,
             n_query_groups=cfg.n_kv_heads)
    lit_cfg = Config(
        name="tokenmill-shape", block_size=cfg.max_seq_len, vocab_size=cfg.padded_vocab_size,
        padded_vocab_size=cfg.padded_vocab_size, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.dim,
        rotary_percentage=1.0, parallel_residual=False, norm_eps=cfg.norm_eps, rope_base=int(cfg.rope_theta),
        **layout,
    )
    model = GPT(lit_cfg).to(device).train()
    forward = torch.compile(model) if tcfg.compile else model

    def loss(x, y):
        return F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten())

    return _trainer(model, loss, tcfg, device, bf16)


def measure(build: Callable[[], Step], batch: tuple[torch.Tensor, torch.Tensor], warmup: int, steps: int,
            device: torch.device, flops_per_token: float, peak: float | None) -> dict:
    """Tokens/s over ``steps`` timed steps after ``warmup`` untimed ones; peak memory over both."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step = build()
    for _ in range(warmup):
        step(*batch)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    if cuda:
        torch.cuda.synchronize(device)
    tokens_per_s = steps * batch[0].numel() / (time.perf_counter() - start)
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }


def _release() -> None:
    """Free one contender's model, optimizer and compiled graphs before the next is built."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="124M", help="tokenmill model preset (default 124M)")
    parser.add_argument("--vocab", type=int, default=None, help="default 50304 (--objective mlm on CPU: 8192)")
    parser.add_argument("--seq", type=int, default=None, help="default 1024 (--objective mlm on CPU: 128)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default 16 (--objective mlm on CPU: 8)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--ac", default="none", help="tokenmill activation checkpointing modes to measure, "
                                                     "comma-separated: none, selective, full")
    parser.add_argument("--peers", default=None, help="peers to measure, comma-separated, empty for none: hf, "
                        "litgpt (default both); with --objective mlm hf (ModernBERT, dense decoder; the default) "
                        "and hf_sparse (its sparse_prediction, a reference)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--doc-mask", action="store_true",
                        help="tokenmill with document masking (train.doc_mask), EOS every ~seq/4 tokens")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, fp32, no compile, a tiny shape and 3 steps: checks the benchmark runs")
    parser.add_argument("--objective", choices=("clm", "mlm"), default="clm",
                        help="clm: the decoder (Llama) beside HF Llama and litgpt; mlm: the encoder (MaskedLM) "
                        "beside HF ModernBertForMaskedLM, in interleaved rounds")
    parser.add_argument("--rounds", type=int, default=5, help="--objective mlm: interleaved timing rounds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--cpu-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="decoder on CPU: every contender's compute dtype (bfloat16: autocast, as train.dtype "
                        "bfloat16 runs)")
    args = parser.parse_args()
    if args.objective == "mlm":
        return encoder_main(args)
    if not args.smoke and (args.device == "cpu" or not torch.cuda.is_available()):
        return decoder_cpu_main(args)
    args.vocab, args.seq, args.micro_batch = args.vocab or 50304, args.seq or 1024, args.micro_batch or 16
    args.peers = "hf,litgpt" if args.peers is None else args.peers

    eos_id = 0 if args.doc_mask else None  # any id: the batches below place it
    if args.smoke:
        device, bf16, compile_ = torch.device("cpu"), False, False
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64, eos_id=eos_id)
        micro_batch, seq, warmup, steps = 2, 64, 1, 3
    else:
        device, bf16, compile_ = torch.device("cuda"), True, not args.no_compile
        torch.set_float32_matmul_precision("high")
        cfg = ModelConfig(preset=args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq, 1024),
                          eos_id=eos_id)
        micro_batch, seq, warmup, steps = args.micro_batch, args.seq, args.warmup, args.steps

    with torch.device("meta"):
        flops_per_token = Llama(cfg).flops_per_token(seq)
    peak = peak_flops(device, bf16)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq), device=device)
    if args.doc_mask:  # a few documents per row, as packed web text has (FlexAttention's cost follows their length)
        x[torch.rand(x.shape, device=device) < 4 / seq] = eos_id
    batch = (x, torch.roll(x, -1, dims=1))
    base = dict(seq_len=seq, micro_batch_size=micro_batch, global_batch_tokens=micro_batch * seq,
                compile=compile_, device=str(device), dtype="bfloat16" if bf16 else "float32",
                doc_mask=args.doc_mask)

    results: dict[str, dict] = {}
    contenders: list[tuple[str, Callable[[], Step]]] = []
    for mode in args.ac.split(","):
        tcfg = TrainConfig(**base, activation_checkpointing=mode)
        tags = ([] if mode == "none" else [f"ac={mode}"]) + (["doc_mask"] if args.doc_mask else [])
        name = f"tokenmill[{','.join(tags)}]" if tags else "tokenmill"
        contenders.append((name, lambda tcfg=tcfg: tokenmill_step(cfg, tcfg, device, bf16)))
    peers = {"hf": ("hf_llama", hf_step), "litgpt": ("litgpt", litgpt_step)}
    for peer in filter(None, args.peers.split(",")):
        name, build = peers[peer]
        if peer == "litgpt" and cfg.tie_embeddings:
            results[name] = {"skipped": "litgpt's GPT has no tied embeddings; this preset ties them"}
            continue
        peer_base = {**base, "doc_mask": False}  # the peers cannot mask documents
        contenders.append((name, lambda build=build: build(cfg, TrainConfig(**peer_base), device, bf16)))

    for name, build in contenders:
        try:
            results[name] = measure(build, batch, warmup, steps, device, flops_per_token, peak)
        except ImportError as err:
            results[name] = {"skipped": f"{err.name} is not importable (pip install {err.name})"}
        except torch.cuda.OutOfMemoryError:
            results[name] = {"error": f"CUDA out of memory at micro-batch {micro_batch}"}
        _release()

    ours = results.get("tokenmill[doc_mask]" if args.doc_mask else "tokenmill", {}).get("tokens_per_s")
    ratios = {f"tokenmill_vs_{peer}": round(ours / r["tokens_per_s"], 3)
              for peer, r in results.items() if ours and "tokens_per_s" in r and not peer.startswith("tokenmill")}
    print(json.dumps({
        "benchmark": "train_speed",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {"preset": None if args.smoke else args.preset, "dim": cfg.dim, "n_layers": cfg.n_layers,
                  "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_hidden": cfg.ffn_hidden,
                  "vocab": cfg.padded_vocab_size, "tied": cfg.tie_embeddings},
        "seq_len": seq, "micro_batch": micro_batch, "dtype": "bfloat16" if bf16 else "float32",
        "compile": compile_, "doc_mask": args.doc_mask, "warmup_steps": warmup, "timed_steps": steps,
        "flops_per_token": flops_per_token, "peak_flops": peak,
        "torch": torch.__version__, "results": results, **ratios,
    }))


# ---- the encoder (--objective mlm) ---------------------------------------------------------------------


def modernbert_config(cfg: ModelConfig, sparse: bool):
    """HF ModernBERT computing what tokenmill's MaskedLM computes, as ``model/hf_encoder.py`` exports it."""
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, hidden_activation="gelu",
        classifier_activation="gelu", max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        norm_eps=cfg.norm_eps, norm_bias=False, attention_bias=False, mlp_bias=False, decoder_bias=True,
        classifier_bias=False, layer_types=["full_attention"] * cfg.n_layers, global_attn_every_n_layers=1,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": cfg.rope_theta}
                         for kind in ("full_attention", "sliding_attention")},
        local_attention=4 * cfg.max_seq_len, tie_word_embeddings=True, sparse_prediction=sparse,
        attn_implementation="sdpa",  # random tokens: no special-token ids (HF's defaults lie past a small vocab)
        pad_token_id=None, bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None,
    )


def masked_lm_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool) -> Step:
    """tokenmill's MaskedLM as the loop trains it: parallelize, each sequence's mean loss over its masked
    tokens (``train.objectives.Masked``), their mean."""
    from tokenmill.model.encoder import MaskedLM

    model = parallelize(MaskedLM(cfg).to(device), tcfg, None, bf16=bf16)

    def loss(inputs, labels):
        _, token_loss = model(inputs, labels, reduction="none")
        return (token_loss.sum(dim=1) / (labels >= 0).sum(dim=1).clamp(min=1)).mean()

    return _trainer(model, loss, tcfg, device, bf16)


def modernbert_step(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device, bf16: bool, sparse: bool) -> Step:
    from transformers import ModernBertForMaskedLM

    model = ModernBertForMaskedLM(modernbert_config(cfg, sparse)).to(device).train()
    forward = torch.compile(model) if tcfg.compile else model
    return _trainer(model, lambda inputs, labels: forward(input_ids=inputs, labels=labels).loss, tcfg, device, bf16)


def interleaved(contenders: dict[str, tuple[Step, tuple[torch.Tensor, torch.Tensor]]], warmup: int, steps: int,
                rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Tokens/s of each contender in each round: all warmed up first, then ``rounds`` rounds in which each
    runs ``steps`` timed steps, the order rotating by one every round."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step, batch in contenders.values():
        for _ in range(warmup):
            step(*batch)
    sync()
    names = list(contenders)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, batch = contenders[name]
            start = time.perf_counter()
            for _ in range(steps):
                step(*batch)
            sync()
            timings[name].append(round(steps * batch[0].numel() / (time.perf_counter() - start), 1))
    return timings


def encoder_main(args: argparse.Namespace) -> None:
    from tokenmill.tokens.corruption import MaskingConfig, mask_tokens

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("train_speed: --device cuda but torch sees no CUDA device")
    if args.smoke:
        if device.type != "cpu":
            sys.exit("train_speed: --smoke runs on the CPU")
        bf16, compile_, warmup, steps, rounds = False, False, 1, 2, 3
        cfg = ModelConfig(objective="mlm", dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64)
        micro_batch, seq = 2, 64
    elif device.type == "cpu":  # a shape a CPU trains: eager fp32, as the CPU runs of the trainer do
        bf16, compile_ = False, False
        seq, micro_batch = args.seq or 128, args.micro_batch or 8
        cfg = ModelConfig(objective="mlm", dim=256, n_layers=4, n_heads=4, vocab_size=args.vocab or 8192,
                          max_seq_len=seq)
        warmup, steps, rounds = 2, max(1, args.steps // args.rounds), args.rounds
    else:
        bf16, compile_ = True, not args.no_compile
        torch.set_float32_matmul_precision("high")
        seq, micro_batch = args.seq or 1024, args.micro_batch or 16
        cfg = ModelConfig(preset=args.preset, objective="mlm", vocab_size=args.vocab or 50304,
                          max_seq_len=max(seq, 1024))
        warmup, steps, rounds = args.warmup, max(1, args.steps // args.rounds), args.rounds
    with torch.device("meta"):
        from tokenmill.model.encoder import MaskedLM

        flops_per_token = MaskedLM(cfg).flops_per_token(seq)
    peak = peak_flops(device, bf16)

    # Random tokens below four "special" ids at the top of the vocabulary, masked as training masks them.
    masking = MaskingConfig()
    mask_id, specials = cfg.vocab_size - 1, np.arange(cfg.vocab_size - 4, cfg.vocab_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size - 4, (micro_batch, seq))
    inputs, labels = mask_tokens(tokens, np.arange(micro_batch), masking, seed=0, mask_id=mask_id,
                                 vocab_size=cfg.vocab_size, special_ids=specials)
    inputs, labels = torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device)
    hf_labels = labels.masked_fill(labels < 0, -100)
    tcfg = TrainConfig(seq_len=seq, micro_batch_size=micro_batch, global_batch_tokens=micro_batch * seq,
                       compile=compile_, device=str(device), dtype="bfloat16" if bf16 else "float32")

    peers = {"hf": ("hf_modernbert", False), "hf_sparse": ("hf_modernbert_sparse", True)}
    requested = ["hf"] if args.peers is None else [p for p in args.peers.split(",") if p]
    unknown = [p for p in requested if p not in peers]
    if unknown:
        sys.exit(f"train_speed: --objective mlm peers are hf and hf_sparse, not {', '.join(unknown)}")
    results: dict[str, dict] = {}
    contenders: dict[str, tuple[Step, tuple]] = {}
    torch.manual_seed(0)
    contenders["tokenmill"] = (masked_lm_step(cfg, tcfg, device, bf16), (inputs, labels))
    for peer in requested:
        name, sparse = peers[peer]
        try:
            contenders[name] = (modernbert_step(cfg, tcfg, device, bf16, sparse), (inputs, hf_labels))
        except ImportError as err:
            results[name] = {"skipped": f"{err.name} is not importable (pip install {err.name})"}
    timings = interleaved(contenders, warmup, steps, rounds, device)
    for name, rates in timings.items():
        median = float(np.median(rates))
        results[name] = {"tokens_per_s": round(median, 1), "rounds": rates,
                         "mfu": round(flops_per_token * median / peak, 4) if peak else None}
    ours = results["tokenmill"]["tokens_per_s"]
    ratios = {f"tokenmill_vs_{name}": round(ours / r["tokens_per_s"], 3)
              for name, r in results.items() if name != "tokenmill" and "tokens_per_s" in r}
    per_round = {f"tokenmill_vs_{name}_per_round_median": round(float(np.median(
        np.array(timings["tokenmill"]) / np.array(timings[name]))), 3) for name in timings if name != "tokenmill"}
    bar = 1.1 if device.type == "cuda" else 1.0
    ratio = ratios.get("tokenmill_vs_hf_modernbert")
    print(json.dumps({
        "benchmark": "train_speed", "objective": "mlm", "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {"preset": cfg.preset, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "ffn_hidden": cfg.ffn_hidden, "vocab": cfg.padded_vocab_size},
        "seq_len": seq, "micro_batch": micro_batch, "dtype": "bfloat16" if bf16 else "float32", "compile": compile_,
        "masking": masking.model_dump(), "masked_tokens": int((labels >= 0).sum()),
        "hf_setting": "ModernBertForMaskedLM, sparse_prediction=False: its decoder scores every position, as "
                      "tokenmill's MaskedLM does; all layers global attention, sdpa",
        "warmup_steps": warmup, "rounds": rounds, "steps_per_round": steps,
        "flops_per_token": flops_per_token, "peak_flops": peak, "torch": torch.__version__,
        "results": results, **ratios, **per_round,
        "bar": bar, "met": ratio is not None and ratio >= bar,
    }))


# ---- the decoder on a CPU (--device cpu, or no CUDA) ---------------------------------------------------

# The kernels no eager rewrite can shorten at equal FLOPs: the matmuls and the attention.
FLOOR_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def floor_seconds(step: Step, batch: tuple[torch.Tensor, torch.Tensor], steps: int = 2) -> dict:
    """Seconds per step spent in ``FLOOR_OPS`` (the profiler's self CPU time) and their share of the step."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step(*batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    floor = sum(e.self_cpu_time_total for e in events if e.key in FLOOR_OPS)
    return {"matmul_attention_s_per_step": round(floor / 1e6 / steps, 4), "share_of_step": round(floor / total, 3)}


CPU_PEERS = {"hf": "hf_llama", "hf_gpt2": "hf_gpt2", "litgpt": "litgpt", "litgpt_gpt2": "litgpt_gpt2"}
GPT2_PEERS = ("hf_gpt2", "litgpt_gpt2")


def decoder_cpu_main(args: argparse.Namespace) -> None:
    """tokenmill's step as a CPU run takes it (its defaults: eager, fp32 unless ``--cpu-dtype bfloat16``)
    beside the peers at the same matmul FLOPs, in interleaved rounds. Bars: ≥ 1.2× the fastest GPT-2
    architecture peer, ≥ 1.3× HF Llama."""
    device, bf16 = torch.device("cpu"), args.cpu_dtype == "bfloat16"
    seq, micro_batch = args.seq or 256, args.micro_batch or 8
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=args.vocab or 8192, max_seq_len=seq)
    warmup, steps, rounds = 2, max(1, args.steps // args.rounds), args.rounds
    with torch.device("meta"):
        flops_per_token = Llama(cfg).flops_per_token(seq)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq))
    batch = (x, torch.roll(x, -1, dims=1))
    tcfg = TrainConfig(seq_len=seq, micro_batch_size=micro_batch, global_batch_tokens=micro_batch * seq,
                       device="cpu", dtype=args.cpu_dtype)
    builders = {"hf_llama": hf_step, "hf_gpt2": hf_gpt2_step, "litgpt": litgpt_step,
                "litgpt_gpt2": lambda *a: litgpt_step(*a, gpt2=True)}
    requested = list(CPU_PEERS) if args.peers is None else [p for p in args.peers.split(",") if p]
    unknown = [p for p in requested if p not in CPU_PEERS]
    if unknown:
        sys.exit(f"train_speed: CPU peers are {', '.join(CPU_PEERS)}, not {', '.join(unknown)}")
    results: dict[str, dict] = {}
    contenders: dict[str, tuple[Step, tuple]] = {"tokenmill": (tokenmill_step(cfg, tcfg, device, bf16), batch)}
    for peer in requested:
        name = CPU_PEERS[peer]
        try:
            contenders[name] = (builders[name](cfg, tcfg, device, bf16), batch)
        except ImportError as err:
            results[name] = {"skipped": f"{err.name} is not importable (pip install {err.name})"}
    params = {name: sum(p.numel() for p in step.model.parameters()) for name, (step, _) in contenders.items()}
    timings = interleaved(contenders, warmup, steps, rounds, device)
    for name, rates in timings.items():
        results[name] = {"tokens_per_s": round(float(np.median(rates)), 1), "rounds": rates,
                         "parameters": params[name], **floor_seconds(*contenders[name])}
    ours = results["tokenmill"]["tokens_per_s"]
    ratios = {f"tokenmill_vs_{name}": round(ours / r["tokens_per_s"], 3)
              for name, r in results.items() if name != "tokenmill" and "tokens_per_s" in r}
    # the most tokenmill could reach if everything but its matmuls and attention took no time at all
    our_floor = results["tokenmill"]["matmul_attention_s_per_step"]
    ceilings = {f"ceiling_vs_{name}": round(micro_batch * seq / r["tokens_per_s"] / our_floor, 3)
                for name, r in results.items() if name != "tokenmill" and "tokens_per_s" in r}
    gpt2 = [name for name in GPT2_PEERS if "tokens_per_s" in results.get(name, {})]
    fastest = max(gpt2, key=lambda name: results[name]["tokens_per_s"]) if gpt2 else None
    vs_gpt2 = ratios.get(f"tokenmill_vs_{fastest}")
    vs_llama = ratios.get("tokenmill_vs_hf_llama")
    print(json.dumps({
        "benchmark": "train_speed", "objective": "clm", "device": "cpu", "threads": torch.get_num_threads(),
        "shape": {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "ffn_hidden": cfg.ffn_hidden,
                  "gpt2_inner": gpt2_inner(cfg), "vocab": cfg.padded_vocab_size},
        "seq_len": seq, "micro_batch": micro_batch, "dtype": args.cpu_dtype, "compile": False,
        "warmup_steps": warmup, "rounds": rounds, "steps_per_round": steps, "flops_per_token": flops_per_token,
        "torch": torch.__version__, "results": results, **ratios, **ceilings,
        "fastest_gpt2_peer": fastest,
        "bars": {"vs_fastest_gpt2": 1.2, "vs_hf_llama": 1.3},
        "met": {"vs_fastest_gpt2": vs_gpt2 is not None and vs_gpt2 >= 1.2,
                "vs_hf_llama": vs_llama is not None and vs_llama >= 1.3},
    }))


if __name__ == "__main__":
    main()
