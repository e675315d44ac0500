"""Model growth (G_stack, Du et al. 2024) against training the same deep model from scratch.

A half-depth model trains for S tokens; ``model.grow_from`` stacks it twice into the deep model, which
trains for T tokens; the deep model also trains from scratch for T tokens (same data, lr, schedule and
seed). Both deep runs have their own warm-up and cosine decay. Printed, as one JSON line: every run's
in-loop held-out BPB curve and final BPB, the grown run's tokens to reach the scratch run's final BPB
(linear between evaluations; null if never) as a share of T, the bar being ≤ 0.75, and the same share
with the small model's S tokens added at their FLOPs (S · small FLOPs per token / deep FLOPs per token),
which is what growth costs in compute. The corpus split, tokenizer and training run are
``optimizers.py``'s.

    PYTHONPATH=src python benchmarks/growth.py                  # CPU: 9 min on 2 cores
    PYTHONPATH=src python benchmarks/growth.py --device cuda --preset 124M
    PYTHONPATH=src python benchmarks/growth.py --smoke          # bundled demo corpus, seconds
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace

import torch

from data_efficiency import tokens_to_reach
from optimizers import SCALES as DATA_SCALES, Scale, corpus_of, model_config, prepare, run_curve, training_parser
from tokenmill.model.llama import Llama, ModelConfig

BAR = 0.75


@dataclass(frozen=True)
class Growth:
    data: Scale  # corpus split, deep model shape, seq_len, batch, deep steps (T) and evaluations per run
    small_steps: int  # S, in steps of the same batch
    lr: float  # every run's peak learning rate


SCALES = {
    "cpu": Growth(replace(DATA_SCALES["cpu"], train_chars=2_000_000, steps=800, evals=16), small_steps=200, lr=3e-3),
    "gpu": Growth(replace(DATA_SCALES["gpu"], steps=4000), small_steps=1000, lr=1.5e-3),
    "smoke": Growth(replace(DATA_SCALES["smoke"], steps=8, evals=4), small_steps=4, lr=1e-2),
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return Llama(cfg).flops_per_token(seq_len)


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__.splitlines()[0], "/tmp/tokenmill-growth")
    parser.add_argument("--steps", type=int, default=None, help="override T, the deep runs' steps")
    parser.add_argument("--small-steps", type=int, default=None, help="override S, the small run's steps")
    args = parser.parse_args(argv)

    growth = SCALES["smoke" if args.smoke else "gpu" if args.preset else "cpu"]
    scale = replace(growth.data, steps=args.steps or growth.data.steps,
                    model=dict(preset=args.preset) if args.preset else growth.data.model)
    small_steps = args.small_steps or growth.small_steps
    corpus = corpus_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare(corpus, scale, args.workdir)
    deep_cfg = model_config(scale, data)
    small_cfg = model_config(scale, data, n_layers=deep_cfg.n_layers // 2)
    grown_cfg = model_config(scale, data, grow_from=str(args.workdir / "small"), grow={"depth": 2})

    # the small run is a run folder (train/checkpoints), as grow_from reads it
    small = run_curve(small_cfg, scale, data, args.workdir / "small" / "train", args.device, lr=growth.lr,
                      steps=small_steps)
    grown = run_curve(grown_cfg, scale, data, args.workdir / "grown", args.device, lr=growth.lr)
    scratch = run_curve(deep_cfg, scale, data, args.workdir / "scratch", args.device, lr=growth.lr)
    for folder in ("small/train", "grown", "scratch"):
        shutil.rmtree(args.workdir / folder / "checkpoints", ignore_errors=True)

    tokens_per_step = scale.batch_size * scale.seq_len
    deep_tokens, small_tokens = scale.steps * tokens_per_step, small_steps * tokens_per_step
    flops_ratio = flops_per_token(small_cfg, scale.seq_len) / flops_per_token(deep_cfg, scale.seq_len)
    reached = tokens_to_reach(grown["curve"], scratch["final_bpb"])
    ratio = round(reached / deep_tokens, 4) if reached is not None else None
    ratio_with_small = (round((reached + small_tokens * flops_ratio) / deep_tokens, 4)
                        if reached is not None else None)

    def summary(run: dict) -> dict:
        return {"final_bpb": round(run["final_bpb"], 4), "curve": [(t, round(b, 4)) for t, b in run["curve"]],
                "seconds": round(run["seconds"], 1)}

    print(json.dumps({
        "benchmark": "growth", "scale": "smoke" if args.smoke else args.preset or "cpu", "device": args.device,
        "corpus": str(corpus), "domains": list(scale.domains),
        "deep_model": deep_cfg.model_dump(include={"dim", "n_layers", "n_heads", "vocab_size"}),
        "small_layers": small_cfg.n_layers, "depth": 2, "seq_len": scale.seq_len, "batch_size": scale.batch_size,
        "lr": growth.lr, "small_tokens": small_tokens, "deep_tokens": deep_tokens,
        "small_flops_per_deep_token_flops": round(flops_ratio, 4), "peer": "scratch",
        "small": summary(small), "grown": summary(grown), "scratch": summary(scratch),
        "grown_tokens_to_scratch_final": round(reached) if reached is not None else None,
        "token_ratio": ratio, "token_ratio_with_small_flops": ratio_with_small, "bar": BAR,
        "met": {"token_ratio": ratio is not None and ratio <= BAR,
                "token_ratio_with_small_flops": ratio_with_small is not None and ratio_with_small <= BAR},
        "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
