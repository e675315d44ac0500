"""Optimizers at equal tokens: held-out bits per byte and memory of AdamW, Muon, GaLore and SLTrain.

One small model on a few domains of the real corpus (documents split whole by id hash into training and
held-out sets). Every optimizer trains the same shape on the same tokens; its learning rate is the best
final held-out BPB of one seed over the same sweep (``lrs``, printed with each optimizer's table). Then
AdamW and the best of the others train ``seeds - 1`` more seeds at their chosen lr; the rest keep one.
AdamW ("peer": same run, same machine) sets the level: each optimizer's tokens to reach AdamW's final
BPB are read off its mean in-loop BPB curve (linear between evaluations; null if never).

Memory is measured by the trainer (``summary["memory"]``: parameter, gradient and optimizer-state bytes
counted from the tensors, after the first step) and the process's peak; on CPU that peak is the peak RSS
of this process, reset before each run, so ``peak_over_start_bytes`` (the peak less the RSS at the run's
start) is the part the run itself adds. At this size activations and the Python process dominate the
peak, so the analytic ``tokenmill.train.memory.predict`` figures at the 350M preset (micro-batch 1, seq
1024, bf16, full activation checkpointing, GaLore and SLTrain at their papers' 350M rank 256) carry the
memory comparison the DESIGN bars are about: GaLore state and peak ≤ 0.65× AdamW's, SLTrain parameters
+ state and peak ≤ 0.6×.

Prints one JSON line (training lines go to stderr).

    PYTHONPATH=src python benchmarks/optimizers.py                         # CPU: ~12 min (9 min at --steps 150 --seeds 2)
    PYTHONPATH=src python benchmarks/optimizers.py --device cuda --preset 124M
    PYTHONPATH=src python benchmarks/optimizers.py --smoke                 # bundled demo corpus, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from data_efficiency import chunk, corpus_files, per_domain_sample, tokens_to_reach
from tokenmill.documents.schema import make_table
from tokenmill.documents.shards import write_parquet_atomic
from tokenmill.model.llama import ModelConfig
from tokenmill.select.base import id_keys
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer
from tokenmill.train.config import TrainConfig
from tokenmill.train.loop import train
from tokenmill.train.memory import predict

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "src" / "tokenmill" / "data" / "demo"
OPTIMIZERS = ("adamw", "muon", "galore", "sltrain")
# The 350M figures: GaLore's and SLTrain's papers train their 350M models at rank 256.
PREDICT_SETTINGS = {"adamw": {}, "muon": {}, "galore": {"rank": 256}, "sltrain": {"rank": 256}}


@dataclass(frozen=True)
class Scale:
    domains: tuple[str, ...]  # corpus domains trained and evaluated on
    chunk_chars: int  # documents are cut at line ends into pieces of at most this many characters
    train_chars: int  # training text per domain: a uniform sample of its training pieces
    heldout_pieces: int  # held-out pieces per domain scored by the in-loop BPB
    vocab_size: int
    model: dict  # ModelConfig fields
    seq_len: int
    batch_size: int
    steps: int
    evals: int  # in-loop BPB evaluations per run (the curve's points)
    lrs: tuple[float, ...]  # the sweep every optimizer picks its lr from
    seeds: int  # seeds of AdamW and of the best other optimizer
    rank: int  # GaLore's and SLTrain's rank at this shape
    proj_gap: int  # GaLore's steps between SVD refreshes


SCALES = {
    "cpu": Scale(domains=("bible", "code", "manpages", "python_docs", "shakespeare"), chunk_chars=1000,
                 train_chars=1_000_000, heldout_pieces=16, vocab_size=2048,
                 model=dict(dim=128, n_layers=4, n_heads=4, tie_embeddings=True), seq_len=128, batch_size=16,
                 steps=200, evals=10, lrs=(1e-3, 3e-3, 1e-2), seeds=3, rank=32, proj_gap=50),
    "gpu": Scale(domains=("bible", "code", "kernel_docs", "manpages", "python_docs", "shakespeare", "web_html"),
                 chunk_chars=4000, train_chars=40_000_000, heldout_pieces=64, vocab_size=8192,
                 model=dict(preset="124M"),
                 seq_len=1024, batch_size=16, steps=2000, evals=20, lrs=(6e-4, 1.5e-3, 4e-3), seeds=3, rank=192,
                 proj_gap=200),
    "smoke": Scale(domains=("bible", "python_docs", "shakespeare"), chunk_chars=500, train_chars=60_000,
                   heldout_pieces=3, vocab_size=384, model=dict(dim=32, n_layers=2, n_heads=2, tie_embeddings=True),
                   seq_len=32, batch_size=4, steps=6, evals=2, lrs=(3e-3, 1e-2), seeds=2, rank=8, proj_gap=3),
}


@dataclass
class Data:
    tokens: Path  # packed training tokens
    tokenizer_dir: Path
    heldout: pa.Table  # held-out pieces (text, domain)
    vocab_size: int
    eos_id: int
    train_tokens: int  # tokens packed (a run reads steps · batch · seq of them)


def read_domain(path: Path) -> list[dict]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def prepare(corpus: Path, scale: Scale, workdir: Path, *, extra_special: Sequence[str] = ()) -> Data:
    """Split each domain's documents whole (by id hash) into held-out and training pieces, train the
    tokenizer on the training text and pack it."""
    files = {path.name.split(".jsonl")[0]: path for path in corpus_files(corpus)}
    missing = [d for d in scale.domains if d not in files]
    if missing:
        sys.exit(f"no {', '.join(missing)} in {corpus}: build the corpus (bash ../shared/corpora/build_corpus.sh) "
                 "or set TOKENMILL_CORPUS")
    train_rows, heldout_rows = [], []
    for domain in scale.domains:
        docs = read_domain(files[domain])
        order = np.argsort(id_keys(pa.array([d["id"] for d in docs]), seed=1), kind="stable")
        n_heldout = max(1, len(docs) // 10)
        for rank, i in enumerate(order):
            part = heldout_rows if rank < n_heldout else train_rows
            part.extend({"id": f"{docs[i]['id']}#{k}", "text": piece, "domain": domain, "source": files[domain].name}
                        for k, piece in enumerate(chunk(docs[i]["text"], scale.chunk_chars)))
    pieces = per_domain_sample(make_table(train_rows), len(train_rows))  # each domain's pieces, shuffled
    domains = pieces["domain"].to_numpy(zero_copy_only=False)
    chars = np.array([len(t) for t in pieces["text"].to_pylist()])
    within = np.zeros(len(chars), dtype=bool)  # the first train_chars of each domain's shuffled pieces
    for domain in scale.domains:
        mine = domains == domain
        within[mine] = np.cumsum(chars[mine]) <= scale.train_chars
    keep = pieces.filter(pa.array(within))
    heldout = per_domain_sample(make_table(heldout_rows), scale.heldout_pieces)
    shutil.rmtree(workdir / "data", ignore_errors=True)
    tokenizer = train_tokenizer(keep["text"].to_pylist(), scale.vocab_size, workdir / "data" / "tokenizer",
                                extra_special=extra_special)
    write_parquet_atomic(keep, workdir / "data" / "docs" / "shard-00000.parquet")
    meta = pack_documents([workdir / "data" / "docs" / "shard-00000.parquet"], tokenizer, workdir / "data" / "tokens",
                          workers=1)
    return Data(tokens=workdir / "data" / "tokens", tokenizer_dir=workdir / "data" / "tokenizer", heldout=heldout,
                vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, train_tokens=meta["n_tokens"])


def model_config(scale: Scale, data: Data, **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**scale.model, **overrides}, max_seq_len=scale.seq_len, vocab_size=data.vocab_size,
                       eos_id=data.eos_id)


def optimizer_settings(name: str, scale: Scale) -> dict:
    """``train.optimizer`` at this shape: GaLore and SLTrain at ``scale.rank``, the rest their defaults."""
    if name == "galore":
        return {"name": name, "rank": scale.rank, "update_proj_gap": scale.proj_gap}
    if name == "sltrain":
        return {"name": name, "rank": scale.rank}
    return {"name": name}


def reset_peak(device: str) -> int:
    """Start a new peak-memory window; returns the bytes in use now (CPU: the RSS)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    status = Path("/proc/self/status")
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM, the peak RSS the trainer reads
        Path("/proc/self/clear_refs").write_text("5")
    return int(status.read_text().split("VmRSS:")[1].split()[0]) * 1024 if status.exists() else 0


def run_curve(model_cfg: ModelConfig, scale: Scale, data: Data, out: Path, device: str, *, lr: float, seed: int = 0,
              optimizer: dict | None = None, steps: int | None = None, warmup: int | None = None,
              schedule: str = "cosine") -> dict[str, Any]:
    """One complete run (warm-up, a tenth of the steps unless ``warmup`` says, then ``schedule``) from its
    starting point into ``out``; its in-loop BPB curve [(tokens, bpb)], final BPB, memory and seconds.
    Training lines go to stderr."""
    steps = steps or scale.steps
    cfg = TrainConfig(
        seq_len=scale.seq_len, micro_batch_size=scale.batch_size, global_batch_tokens=scale.batch_size * scale.seq_len,
        max_steps=steps, lr=lr, warmup_steps=steps // 10 if warmup is None else warmup, schedule=schedule,
        device=device, seed=seed,
        optimizer=optimizer or {"name": "adamw"}, bpb_every=max(1, steps // scale.evals),
        bpb_docs_per_domain=scale.heldout_pieces, ckpt_every=steps, keep_last_k=1, log_every=steps, eval_every=steps,
    )
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would resume instead of starting afresh
    start_bytes = reset_peak(device)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = train(model_cfg, cfg, data.tokens, out, bpb_docs=data.heldout, tokenizer_dir=data.tokenizer_dir,
                        progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["bpb"]) for r in records if "bpb" in r]
    memory = {**summary["memory"], "peak_over_start_bytes": summary["memory"]["peak_bytes"] - start_bytes}
    return {"curve": curve, "final_bpb": curve[-1][1], "memory": memory, "params": summary["params"],
            "seconds": time.perf_counter() - t0}


def predicted(name: str, per_layer_update: bool = False) -> dict[str, int]:
    """``predict`` at the 350M preset: micro-batch 1, seq 1024, bf16, full activation checkpointing; GaLore
    optionally with the paper's per-layer weight updates (which run without global clipping)."""
    model_cfg = ModelConfig(preset="350M", vocab_size=50304)
    settings = {"name": name, **PREDICT_SETTINGS[name], **({"per_layer_update": True} if per_layer_update else {})}
    cfg = TrainConfig(seq_len=1024, micro_batch_size=1, global_batch_tokens=1024, dtype="bfloat16", device="cuda",
                      activation_checkpointing="full", optimizer=settings, grad_clip=0.0 if per_layer_update else 1.0)
    return predict(model_cfg, cfg, micro_batch=1)


def ratio(a: float, b: float) -> float:
    return round(a / b, 4)


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """The runs' BPB averaged at each evaluation (every run evaluates at the same tokens)."""
    return [(tokens, float(np.mean([r["curve"][i][1] for r in runs])))
            for i, (tokens, _) in enumerate(runs[0]["curve"])]


def training_parser(description: str, workdir: str) -> argparse.ArgumentParser:
    """The options this benchmark and growth.py share: where to train, which corpus, which scale."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--preset", default=None, help="model preset on the GPU scale (e.g. 124M); default: the CPU "
                        "shape")
    parser.add_argument("--smoke", action="store_true", help="the bundled demo corpus, a tiny shape, a few steps")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="folder of <domain>.jsonl(.gz) files (default: $TOKENMILL_CORPUS, the build script's "
                        "output, or with --smoke the bundled demo corpus)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    return parser


def corpus_of(args: argparse.Namespace) -> Path:
    return args.corpus or (DEMO_CORPUS if args.smoke else Path(os.environ.get("TOKENMILL_CORPUS",
                                                                             "/tmp/tokenmill-corpus/out")))


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__.splitlines()[0], "/tmp/tokenmill-optimizers")
    parser.add_argument("--steps", type=int, default=None, help="override the scale's steps per run")
    parser.add_argument("--seeds", type=int, default=None, help="override the scale's seeds")
    parser.add_argument("--lrs", default=None, help="override the scale's lr sweep, comma-separated (e.g. 1e-3,3e-3)")
    args = parser.parse_args(argv)

    scale = SCALES["smoke" if args.smoke else "gpu" if args.preset else "cpu"]
    if args.preset:
        scale = replace(scale, model=dict(preset=args.preset))
    lrs = tuple(float(lr) for lr in args.lrs.split(",")) if args.lrs else scale.lrs
    scale = replace(scale, steps=args.steps or scale.steps, seeds=args.seeds or scale.seeds, lrs=lrs)
    corpus = corpus_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare(corpus, scale, args.workdir)
    model_cfg = model_config(scale, data)

    def run(name: str, lr: float, seed: int) -> dict:
        result = run_curve(model_cfg, scale, data, args.workdir / "runs" / f"{name}-{lr:g}-{seed}", args.device, lr=lr,
                           seed=seed, optimizer=optimizer_settings(name, scale))
        shutil.rmtree(args.workdir / "runs" / f"{name}-{lr:g}-{seed}" / "checkpoints", ignore_errors=True)
        print(f"[optimizers] {name} lr {lr:g} seed {seed}: bpb {result['final_bpb']:.4f}, {result['seconds']:.0f}s",
              file=sys.stderr)
        return result

    sweeps = {name: {lr: run(name, lr, 0) for lr in scale.lrs} for name in OPTIMIZERS}
    best_lr = {name: min(sweep, key=lambda lr: sweep[lr]["final_bpb"]) for name, sweep in sweeps.items()}
    best_other = min(OPTIMIZERS[1:], key=lambda name: sweeps[name][best_lr[name]]["final_bpb"])
    seeded = {name: [sweeps[name][best_lr[name]]] for name in OPTIMIZERS}
    for name in ("adamw", best_other):
        seeded[name] += [run(name, best_lr[name], seed) for seed in range(1, scale.seeds)]

    adamw_final = float(np.mean([r["final_bpb"] for r in seeded["adamw"]]))
    adamw_memory = seeded["adamw"][0]["memory"]
    adamw_predicted = predicted("adamw")
    results = {}
    for name in OPTIMIZERS:
        finals = [r["final_bpb"] for r in seeded[name]]
        memory = seeded[name][0]["memory"]
        reached = tokens_to_reach(mean_curve(seeded[name]), adamw_final)
        forecast = predicted(name)
        results[name] = {
            "settings": optimizer_settings(name, scale),
            "lr_sweep": [{"lr": lr, "final_bpb": round(r["final_bpb"], 4), "seconds": round(r["seconds"], 1)}
                         for lr, r in sweeps[name].items()],
            "lr": best_lr[name],
            "lr_at_sweep_edge": best_lr[name] in (min(scale.lrs), max(scale.lrs)),
            "seeds": len(finals),
            "final_bpb": {"mean": round(float(np.mean(finals)), 4),
                          "std": round(float(np.std(finals, ddof=1)), 4) if len(finals) > 1 else None,
                          "per_seed": [round(f, 4) for f in finals]},
            "curve": [(t, round(b, 4)) for t, b in mean_curve(seeded[name])],
            "tokens_to_adamw_final": round(reached) if reached is not None else None,
            "trained_params": seeded[name][0]["params"],
            "measured": memory,
            "predicted_350M": forecast,
            "vs_adamw": {
                "final_bpb": ratio(np.mean(finals), adamw_final),
                "tokens_to_adamw_final": ratio(reached, scale.steps * scale.batch_size * scale.seq_len)
                if reached is not None else None,
                "optimizer_state_bytes": ratio(memory["optimizer_state_bytes"], adamw_memory["optimizer_state_bytes"]),
                "param_bytes": ratio(memory["param_bytes"], adamw_memory["param_bytes"]),
                "peak_bytes": ratio(memory["peak_bytes"], adamw_memory["peak_bytes"]),
                "peak_over_start_bytes": ratio(memory["peak_over_start_bytes"], adamw_memory["peak_over_start_bytes"]),
                "predicted_350M_optimizer_state_bytes": ratio(forecast["optimizer_state_bytes"],
                                                              adamw_predicted["optimizer_state_bytes"]),
                "predicted_350M_params_plus_state_bytes": ratio(
                    forecast["param_bytes"] + forecast["optimizer_state_bytes"],
                    adamw_predicted["param_bytes"] + adamw_predicted["optimizer_state_bytes"]),
                "predicted_350M_total_bytes": ratio(forecast["total_bytes"], adamw_predicted["total_bytes"]),
            },
        }
    galore, sltrain = results["galore"]["vs_adamw"], results["sltrain"]["vs_adamw"]
    per_layer = predicted("galore", per_layer_update=True)
    per_layer_total = ratio(per_layer["total_bytes"], adamw_predicted["total_bytes"])
    print(json.dumps({
        "benchmark": "optimizers", "scale": "smoke" if args.smoke else args.preset or "cpu", "device": args.device,
        "corpus": str(corpus), "domains": list(scale.domains), "model": model_cfg.model_dump(
            include={"dim", "n_layers", "n_heads", "vocab_size"}),
        "seq_len": scale.seq_len, "batch_size": scale.batch_size, "steps": scale.steps,
        "train_tokens": scale.steps * scale.batch_size * scale.seq_len, "packed_tokens": data.train_tokens,
        "heldout_pieces": data.heldout.num_rows,
        "lr_sweep": list(scale.lrs), "lr_choice": "best final held-out BPB of seed 0 over lr_sweep, per optimizer",
        "seeded": f"seeds 0..{scale.seeds - 1} for adamw and {best_other} (best non-AdamW) at their lr; one seed for "
                  "the others",
        "peer": "adamw", "best_non_adamw": best_other,
        "bars_350M": {
            "galore": {"optimizer_state_ratio": galore["predicted_350M_optimizer_state_bytes"],
                       "peak_ratio": galore["predicted_350M_total_bytes"], "target": 0.65,
                       "met": max(galore["predicted_350M_optimizer_state_bytes"],
                                  galore["predicted_350M_total_bytes"]) <= 0.65,
                       "per_layer_update": {"peak_ratio": per_layer_total, "predicted_350M": per_layer,
                                            "met": max(galore["predicted_350M_optimizer_state_bytes"],
                                                       per_layer_total) <= 0.65}},
            "sltrain": {"params_plus_state_ratio": sltrain["predicted_350M_params_plus_state_bytes"],
                        "peak_ratio": sltrain["predicted_350M_total_bytes"], "target": 0.6,
                        "met": max(sltrain["predicted_350M_params_plus_state_bytes"],
                                   sltrain["predicted_350M_total_bytes"]) <= 0.6},
        },
        "optimizers": results, "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
