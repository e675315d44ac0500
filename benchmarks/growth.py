"""Model growth (G_stack, Du et al. 2024) against training the same deep model from scratch.

A model of 1/depth the layers trains for S steps; ``model.grow_from`` stacks it ``depth`` times into the
deep model, which trains for T steps; the deep model also trains from scratch for T steps (same data,
schedule shape and seed). Printed, as one JSON line: every run's in-loop held-out BPB curve and final BPB,
the grown run's tokens to reach the scratch run's final BPB (linear between evaluations; null if never) as
a share of T, the bar being ≤ 0.75, and the same share with the small model's S tokens added at their
FLOPs (S · small FLOPs per token / deep FLOPs per token), which is what growth costs in compute. The
corpus split, tokenizer and training run are ``optimizers.py``'s.

The recipe (``Growth``; every field printed under "recipe"), chosen by experiment at the CPU scale:

* S : T = 1 : 2 at the old total of 1000 steps (S = 333, T = 667): the bar counts T only, and the
  compute-counted ratio (``token_ratio_with_small_flops``) says what the small model's S steps cost;
* the small model grows from a checkpoint still in training, as in the paper: it warms up over 10% of S
  and then holds its peak lr (``small_schedule="constant"``), with no decay before it is stacked (at
  these short runs it is also the better small model: 2.93 BPB at 100 steps against 3.06 with cosine);
* the grown run warms up over ``grown_warmup`` = 5 steps only (its weights are trained already), the
  scratch run over 10% of T; both then decay by cosine to 0.1 × peak at T;
* every run uses the same peak lr, 3e-3 (``lrs``, a sweep of one: AdamW's best of 1e-3 / 3e-3 / 1e-2 at
  this shape in ``optimizers.py``'s 150-step sweep); ``--lrs 1.5e-3,3e-3`` sweeps, and both deep runs then
  keep their own best final BPB (every run of the sweep under each run's "lr_sweep", the choice as "lr").

What decided it (T = 400 steps, lr 3e-3 for every run, scratch final 2.3525): S = 100 with a constant
small lr and a 5-step warm-up still lost at the end (grown 2.3611, ahead until ~350 of 400 steps);
S = 200 with the same settings reached scratch's final at 0.48 × T (0.78 × T with the small model's
FLOPs). The previous recipe (S = 200 of a cosine-annealed small model, T = 800, 10% re-warm-up to the
full lr) lost: final BPB 2.112 against 2.013, ahead only until ~400k tokens. This default (S = 333,
T = 667): grown final 1.986 against scratch 2.079, scratch's final reached at 0.61 × T (bar met), 0.91 × T
with the small model's FLOPs (not met).

    PYTHONPATH=src python benchmarks/growth.py                  # CPU: ~5 min on 2 idle cores
    PYTHONPATH=src python benchmarks/growth.py --device cuda --preset 124M
    PYTHONPATH=src python benchmarks/growth.py --smoke          # bundled demo corpus, seconds
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from data_efficiency import tokens_to_reach
from optimizers import SCALES as DATA_SCALES, Data, Scale, corpus_of, model_config, prepare, run_curve, training_parser
from tokenmill.model.llama import Llama, ModelConfig

BAR = 0.75


@dataclass(frozen=True)
class Growth:
    data: Scale  # corpus split, deep model shape, seq_len, batch, deep steps (T) and evaluations per run
    small_steps: int  # S, in steps of the same batch
    small_lr: float  # the small run's peak lr
    small_schedule: str  # the small run's schedule after its 10% warm-up: "constant" = still in training
    lrs: tuple[float, ...]  # the peak lrs both deep runs sweep (each keeps its best final BPB)
    grown_warmup: int  # the grown run's warm-up steps (the scratch run's: 10% of T)
    depth: int = 2  # growth factor: the small model has n_layers / depth layers
    small_seed: int = 0  # the small run's seed (its init and data order); the deep runs use seed 0


SCALES = {
    "cpu": Growth(replace(DATA_SCALES["cpu"], train_chars=2_000_000, steps=667, evals=16), small_steps=333,
                  small_lr=3e-3, small_schedule="constant", lrs=(3e-3,), grown_warmup=5),
    # not measured on a GPU: the CPU recipe's S : T = 1 : 2 at the old total (1000 + 4000 steps)
    "gpu": Growth(replace(DATA_SCALES["gpu"], steps=3333), small_steps=1667, small_lr=1.5e-3,
                  small_schedule="constant", lrs=(1.5e-3,), grown_warmup=20),
    "smoke": Growth(replace(DATA_SCALES["smoke"], steps=8, evals=4), small_steps=4, small_lr=1e-2,
                    small_schedule="constant", lrs=(1e-2,), grown_warmup=1),
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return Llama(cfg).flops_per_token(seq_len)


def sweep(name: str, model_cfg: ModelConfig, scale: Scale, data: Data, workdir: Path, device: str,
          lrs: tuple[float, ...], warmup: int) -> tuple[float, dict[float, dict]]:
    """The deep run at each lr of ``lrs``; (the lr of the best final BPB, every run by lr)."""
    runs = {}
    for lr in lrs:
        runs[lr] = run_curve(model_cfg, scale, data, workdir / f"{name}-{lr:g}", device, lr=lr, steps=scale.steps,
                             warmup=warmup)
        shutil.rmtree(workdir / f"{name}-{lr:g}" / "checkpoints", ignore_errors=True)
        print(f"[growth] {name} lr {lr:g}: bpb {runs[lr]['final_bpb']:.4f}, {runs[lr]['seconds']:.0f}s",
              file=sys.stderr)
    return min(runs, key=lambda lr: runs[lr]["final_bpb"]), runs


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__.splitlines()[0], "/tmp/tokenmill-growth")
    parser.add_argument("--steps", type=int, default=None, help="override T, the deep runs' steps")
    parser.add_argument("--small-steps", type=int, default=None, help="override S, the small run's steps")
    parser.add_argument("--lrs", type=lambda s: tuple(float(x) for x in s.split(",")), default=None,
                        help="override the deep runs' lr sweep (comma-separated)")
    parser.add_argument("--small-lr", type=float, default=None, help="override the small run's peak lr")
    parser.add_argument("--small-schedule", choices=("constant", "cosine"), default=None,
                        help="override the small run's schedule after warm-up")
    parser.add_argument("--grown-warmup", type=int, default=None, help="override the grown run's warm-up steps")
    parser.add_argument("--depth", type=int, default=None, help="override the growth factor")
    parser.add_argument("--small-seed", type=int, default=None, help="override the small run's seed")
    args = parser.parse_args(argv)

    growth = SCALES["smoke" if args.smoke else "gpu" if args.preset else "cpu"]
    scale = replace(growth.data, steps=args.steps or growth.data.steps,
                    model=dict(preset=args.preset) if args.preset else growth.data.model)
    growth = replace(growth, data=scale, small_steps=args.small_steps or growth.small_steps,
                     lrs=args.lrs or growth.lrs, small_lr=args.small_lr or growth.small_lr,
                     small_schedule=args.small_schedule or growth.small_schedule,
                     grown_warmup=growth.grown_warmup if args.grown_warmup is None else args.grown_warmup,
                     depth=args.depth or growth.depth,
                     small_seed=growth.small_seed if args.small_seed is None else args.small_seed)
    corpus = corpus_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare(corpus, scale, args.workdir)
    deep_cfg = model_config(scale, data)
    if deep_cfg.n_layers % growth.depth:
        parser.error(f"--depth {growth.depth} does not divide the deep model's {deep_cfg.n_layers} layers")
    small_cfg = model_config(scale, data, n_layers=deep_cfg.n_layers // growth.depth)
    grown_cfg = model_config(scale, data, grow_from=str(args.workdir / "small"), grow={"depth": growth.depth})

    # the small run is a run folder (train/checkpoints), as grow_from reads it
    small = run_curve(small_cfg, scale, data, args.workdir / "small" / "train", args.device, lr=growth.small_lr,
                      steps=growth.small_steps, schedule=growth.small_schedule, seed=growth.small_seed)
    grown_lr, grown_runs = sweep("grown", grown_cfg, scale, data, args.workdir, args.device, growth.lrs,
                                 growth.grown_warmup)
    scratch_lr, scratch_runs = sweep("scratch", deep_cfg, scale, data, args.workdir, args.device, growth.lrs,
                                     scale.steps // 10)
    shutil.rmtree(args.workdir / "small" / "train" / "checkpoints", ignore_errors=True)
    grown, scratch = grown_runs[grown_lr], scratch_runs[scratch_lr]

    tokens_per_step = scale.batch_size * scale.seq_len
    deep_tokens, small_tokens = scale.steps * tokens_per_step, growth.small_steps * tokens_per_step
    flops_ratio = flops_per_token(small_cfg, scale.seq_len) / flops_per_token(deep_cfg, scale.seq_len)
    reached = tokens_to_reach(grown["curve"], scratch["final_bpb"])
    ratio = round(reached / deep_tokens, 4) if reached is not None else None
    ratio_with_small = (round((reached + small_tokens * flops_ratio) / deep_tokens, 4)
                        if reached is not None else None)

    def summary(result: dict, lr: float, runs: dict[float, dict] | None = None) -> dict:
        out = {"lr": lr, "final_bpb": round(result["final_bpb"], 4),
               "curve": [(t, round(b, 4)) for t, b in result["curve"]], "seconds": round(result["seconds"], 1)}
        if runs is not None:
            out["lr_sweep"] = [{"lr": x, "final_bpb": round(r["final_bpb"], 4), "seconds": round(r["seconds"], 1)}
                               for x, r in runs.items()]
        return out

    recipe = {k: v for k, v in asdict(growth).items() if k != "data"}
    print(json.dumps({
        "benchmark": "growth", "scale": "smoke" if args.smoke else args.preset or "cpu", "device": args.device,
        "corpus": str(corpus), "domains": list(scale.domains),
        "deep_model": deep_cfg.model_dump(include={"dim", "n_layers", "n_heads", "vocab_size"}),
        "small_layers": small_cfg.n_layers, "depth": growth.depth, "seq_len": scale.seq_len,
        "batch_size": scale.batch_size, "deep_steps": scale.steps, "small_steps": growth.small_steps,
        "recipe": {**recipe, "scratch_warmup": scale.steps // 10, "small_warmup": growth.small_steps // 10,
                   "deep_schedule": "cosine to 0.1 x peak", "lr_choice": "best final held-out BPB over lrs, per run"},
        "lr_sweep": list(growth.lrs), "small_tokens": small_tokens, "deep_tokens": deep_tokens,
        "small_flops_per_deep_token_flops": round(flops_ratio, 4), "peer": "scratch",
        "small": summary(small, growth.small_lr), "grown": summary(grown, grown_lr, grown_runs),
        "scratch": summary(scratch, scratch_lr, scratch_runs),
        "grown_tokens_to_scratch_final": round(reached) if reached is not None else None,
        "token_ratio": ratio, "token_ratio_with_small_flops": ratio_with_small, "bar": BAR,
        "met": {"token_ratio": ratio is not None and ratio <= BAR,
                "token_ratio_with_small_flops": ratio_with_small is not None and ratio_with_small <= BAR},
        "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
