"""Data efficiency of selection methods: target-domain bits per byte against training tokens.

Two settings of DESIGN.md's data-efficiency row, for one target domain (default python_docs):

* **in pool**: the pool holds the target domain's documents among all the others;
* **out of pool**: the pool holds every domain but the target.

In both, the selection methods see only a target sample of ``target_docs`` documents of the target
domain, and the model is evaluated on held-out documents of it (and of every other domain). Each
method scores the pool as its curation step does (same code path as a recipe); the benchmark then
keeps the highest-ranked documents until a token budget (a fixed share of the pool's tokens, counted
with the training tokenizer) and trains the same small model on them for the same number of tokens.
Random selection, by id hash, is the peer; ``--methods ... oracle`` adds a selection that reads the
domain labels (target pieces first): what a perfect domain filter would give at this scale.
Tokens-to-reach is measured two ways, both printed:

* ``complete_runs``: one complete run (its own warm-up and cosine decay) per share of the training
  tokens in ``run_fractions``: every point is a finished model trained on that many tokens, so a
  ratio of 1/16 means "already reached by the shortest run";
* ``within_run``: the longest run's own evaluations every tenth of it, as a training curve is usually
  read; an early point has not decayed its learning rate, so it understates what a run of that
  length would reach, for every method alike. Documents are first cut at line boundaries into pieces of
at most ``chunk_chars`` characters, so selection works at a finer grain than whole files (the same
pieces for every method).

Printed: one JSON line with, per setting and method, the selection cost (proxy FLOPs, seconds), the
target-BPB curves, the tokens needed to reach random's final target BPB (and that as a share of the
training tokens: the ``token_ratio`` the DESIGN bar is about), the final target BPB and the mean
BPB on the other domains; a PNG plots every curve (complete runs solid, within-run dashed).

Build the corpus first (``bash ../shared/corpora/build_corpus.sh``) or point TOKENMILL_CORPUS at an
``out`` folder of ``<domain>.jsonl`` files.

    PYTHONPATH=src python benchmarks/data_efficiency.py                  # CPU: tiny model; 3.5 min on 2 idle cores
    PYTHONPATH=src python benchmarks/data_efficiency.py --device cuda --scale full [--settings in_pool]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tokenmill.documents.schema import make_table
from tokenmill.documents.shards import write_parquet_atomic
from tokenmill.model.llama import ModelConfig
from tokenmill.select.base import ScoreStep, id_keys
from tokenmill.select.color_filter import ColorFilter
from tokenmill.select.dsir import Dsir
from tokenmill.select.perplexity import PerplexityBand
from tokenmill.select.preselect import PreSelect
from tokenmill.select.quality import QualityClassifier
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer
from tokenmill.train.config import TrainConfig
from tokenmill.train.loop import train

METHODS = ("random", "dsir", "quality_classifier", "perplexity", "color_filter", "preselect", "oracle")
DEFAULT_METHODS = METHODS[:-1]
SETTINGS = ("in_pool", "out_of_pool")


@dataclass(frozen=True)
class Scale:
    chunk_chars: int  # documents are cut into pieces of at most this many characters
    pool_chunks_per_domain: int | None  # a uniform sample of each domain's pieces; None: all of them
    target_docs: int  # documents of the target domain the methods see
    target_pieces: int  # at most this many of their pieces (a uniform sample) are used
    heldout_docs: int  # held-out documents per domain (the target's: its evaluation set)
    eval_pieces: tuple[int, int]  # held-out pieces scored per evaluation: of the target, of each other domain
    budget_fraction: float  # selected tokens as a share of the pool's
    vocab_size: int
    model: dict  # ModelConfig fields of the trained model
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    run_fractions: tuple[float, ...]  # each method trains one complete run per share of ``steps``
    proxy: dict  # ProxyConfig fields shared by the proxy-based methods
    step_params: dict = field(default_factory=dict)  # per-method extra parameters


SCALES = {
    "cpu": Scale(
        chunk_chars=1000, pool_chunks_per_domain=160, target_docs=200, target_pieces=300, heldout_docs=20,
        eval_pieces=(16, 4), budget_fraction=0.12, vocab_size=1024,
        model=dict(dim=64, n_layers=2, n_heads=4, tie_embeddings=True), seq_len=128, batch_size=16, steps=150,
        lr=3e-3, run_fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1),
        proxy=dict(dim=64, n_layers=2, n_heads=4, seq_len=128, batch_size=16, steps=80, lr=3e-3,
                   warmup_steps=8, vocab_size=1024, max_score_chars=1000, score_batch_size=64),
        step_params=dict(color_filter=dict(target_steps=40), perplexity=dict(sample_docs=600), preselect=dict(
            target_steps=40, domain_docs=150, label_docs=300, sample_docs=600)),
    ),
    # the slow test's: the bundled demo corpus (--corpus src/tokenmill/data/demo, three domains)
    "demo": Scale(
        chunk_chars=1000, pool_chunks_per_domain=120, target_docs=10, target_pieces=200, heldout_docs=3,
        eval_pieces=(12, 6), budget_fraction=0.2, vocab_size=512,
        model=dict(dim=32, n_layers=1, n_heads=2, tie_embeddings=True), seq_len=64, batch_size=8, steps=40,
        lr=5e-3, run_fractions=(1 / 4, 1),
        proxy=dict(dim=32, n_layers=1, n_heads=2, seq_len=64, batch_size=8, steps=30, lr=5e-3,
                   warmup_steps=3, vocab_size=512, max_score_chars=500, score_batch_size=64),
        step_params=dict(color_filter=dict(target_steps=15)),
    ),
    "full": Scale(
        chunk_chars=4000, pool_chunks_per_domain=None, target_docs=200, target_pieces=100_000, heldout_docs=50,
        eval_pieces=(200, 50),
        budget_fraction=0.1,
        vocab_size=8192, model=dict(preset="20M"), seq_len=1024, batch_size=16, steps=1000, lr=1.5e-3,
        run_fractions=(1 / 25, 1 / 16, 1 / 10, 1 / 8, 1 / 4, 1 / 2, 1),
        proxy=dict(dim=256, n_layers=4, n_heads=4, seq_len=512, batch_size=32, steps=1000, lr=2e-3,
                   warmup_steps=100, vocab_size=8192, max_score_chars=4000, score_batch_size=128),
        step_params=dict(color_filter=dict(target_steps=300, sample_docs=20000), preselect=dict(
            target_steps=300, domain_docs=5000, label_docs=5000, sample_docs=20000),
            perplexity=dict(sample_docs=20000)),
    ),
}


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at line ends into pieces of at most ``max_chars`` (a longer line is cut inside)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    return [p for p in [*pieces, current] if p.strip()]


def corpus_files(root: Path) -> list[Path]:
    """The corpus's ``<domain>.jsonl`` (or ``.jsonl.gz``, as the bundled demo corpus) files."""
    return sorted([*root.glob("*.jsonl"), *root.glob("*.jsonl.gz")])


def load_corpus(root: Path, target: str, scale: Scale) -> dict[str, pa.Table]:
    """Held-out, target-sample and pool pieces; documents are split among them by id hash, whole."""
    pool, heldout, target_rows = [], [], []
    for path in corpus_files(root):
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        domain = path.name.split(".jsonl")[0]
        order = np.argsort(id_keys(pa.array([d["id"] for d in docs]), seed=1), kind="stable")
        n_target = scale.target_docs if domain == target else 0
        for rank, i in enumerate(order):
            doc = docs[i]
            part = (heldout if rank < scale.heldout_docs
                    else target_rows if rank < scale.heldout_docs + n_target else pool)
            part.extend({"id": f"{doc['id']}#{k}", "text": piece, "domain": domain, "source": path.name}
                        for k, piece in enumerate(chunk(doc["text"], scale.chunk_chars)))
    heldout = make_table(heldout)
    on_target = pc.equal(heldout["domain"], target).to_numpy(zero_copy_only=False)
    pool = make_table(pool)
    pool = pool.take(np.argsort(id_keys(pool["id"], seed=2)))  # shards then mix domains, as a real pool's do
    return {
        "heldout": pa.concat_tables([per_domain_sample(heldout.filter(on_target), scale.eval_pieces[0]),
                                     per_domain_sample(heldout.filter(~on_target), scale.eval_pieces[1])]),
        "target": make_table(target_rows),
        "pool": pool if scale.pool_chunks_per_domain is None
        else per_domain_sample(pool, scale.pool_chunks_per_domain),
    }


def per_domain_sample(table: pa.Table, k: int) -> pa.Table:
    """At most ``k`` pieces of each domain, chosen uniformly by id hash, in that (random) order."""
    keys = id_keys(table["id"], seed=2)
    domains = table["domain"].to_numpy(zero_copy_only=False)
    keep = np.concatenate([np.flatnonzero(domains == d)[np.argsort(keys[domains == d])[:k]]
                           for d in np.unique(domains)] or [np.empty(0, np.int64)])
    return table.take(keep[np.argsort(keys[keep])])


def make_step(method: str, target_file: Path, scale: Scale, device: str, scratch: Path) -> ScoreStep | None:
    """The method's curation step, scoring only (the benchmark applies the token budget)."""
    target = {"sources": [{"path": str(target_file)}], "max_docs": scale.target_pieces}
    proxy = {**scale.proxy, "device": device}
    extra = scale.step_params.get(method, {})
    if method in ("random", "oracle"):
        return None
    if method == "dsir":
        return Dsir(target=target)
    if method == "quality_classifier":
        return QualityClassifier(positive=target)
    if method == "perplexity":
        return PerplexityBand(reference=target, band=None, proxy=proxy, scratch=str(scratch), **extra)
    if method == "color_filter":
        return ColorFilter(target=target, proxy=proxy, scratch=str(scratch), **extra)
    return PreSelect(target=target, proxy=proxy, scratch=str(scratch), **extra)


def ranking_keys(step: ScoreStep | None, pool: pa.Table, shard_rows: int) -> tuple[np.ndarray, dict[str, int]]:
    """Every pool document's ranking key (higher first) and the step's counters, run shard by shard
    through the executor protocol (fit rounds, then process)."""
    if step is None:
        return (id_keys(pool["id"], seed=3) >> np.uint64(11)).astype(np.float64), {}
    shards = [pool.slice(start, shard_rows) for start in range(0, pool.num_rows, shard_rows)]
    for _ in range(step.fit_rounds):
        step.fit_reduce([step.fit_map(shard) for shard in shards])
    results = [step.process(shard) for shard in shards]
    scored = pa.concat_tables([r.kept for r in results])
    assert scored.num_rows == pool.num_rows, "a scoring-only step must keep every document"
    keys = step.selection_keys(scored, scored[step.score_column].to_numpy(zero_copy_only=False))
    counters: dict[str, int] = {}
    for r in results:
        for name, value in r.counters.items():
            counters[name] = counters.get(name, 0) + value
    return np.where(np.isnan(keys), -np.inf, keys), counters


def take_budget(keys: np.ndarray, ties: np.ndarray, tokens: np.ndarray, budget: int) -> np.ndarray:
    """Rows of the highest keys until ``budget`` tokens; the row that crosses it is kept."""
    order = np.lexsort((ties, -keys))
    n = int(np.searchsorted(np.cumsum(tokens[order]), budget)) + 1
    return np.sort(order[:n])


def train_on(selected: pa.Table, heldout: pa.Table, tokenizer, tokenizer_dir: Path, scale: Scale, device: str,
             out: Path) -> tuple[list[dict], list[dict]]:
    """Train the benchmark model on ``selected``, one complete run (warm-up and cosine decay of its own)
    per share of ``scale.steps`` in ``scale.run_fractions``. Returns each run's final metric record
    and the bits-per-byte records of the longest run, evaluated every tenth of it.

    Separate runs, not one run's intermediate evaluations: a point early in a cosine run has not
    decayed its learning rate, so it would understate what a model trained on that many tokens reaches.
    """
    # One label: the loader streams the selection as one mixture, whatever its domains' sizes.
    selected = selected.set_column(selected.schema.get_field_index("domain"), "domain",
                                   pa.array(["selected"] * selected.num_rows))
    write_parquet_atomic(selected, out / "docs" / "shard-00000.parquet")
    pack_documents([out / "docs" / "shard-00000.parquet"], tokenizer, out / "tokens", workers=1)
    model_cfg = ModelConfig(**scale.model, max_seq_len=scale.seq_len, vocab_size=len(tokenizer),
                            eos_id=tokenizer.eos_token_id)
    finals, within = [], []
    for fraction in scale.run_fractions:
        steps = max(1, round(fraction * scale.steps))
        bpb_every = max(1, steps // 10) if fraction == max(scale.run_fractions) else steps
        train_cfg = TrainConfig(
            seq_len=scale.seq_len, micro_batch_size=scale.batch_size,
            global_batch_tokens=scale.batch_size * scale.seq_len, max_steps=steps, lr=scale.lr,
            warmup_steps=steps // 10, schedule="cosine", device=device, bpb_every=bpb_every,
            bpb_docs_per_domain=max(scale.eval_pieces), ckpt_every=steps, keep_last_k=1, log_every=steps,
            eval_every=steps, dtype="auto",
        )
        run = out / f"train-{steps}"
        train(model_cfg, train_cfg, out / "tokens", run, bpb_docs=heldout, tokenizer_dir=tokenizer_dir,
              progress=False)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evaluations = [r for r in records if "bpb" in r]
        finals.append(evaluations[-1])
        if bpb_every < steps:
            within = evaluations
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return finals, within


def tokens_to_reach(curve: list[tuple[int, float]], level: float) -> float | None:
    """Training tokens at which the curve first gets down to ``level`` (linear between points)."""
    previous = (0, np.inf)
    for tokens, bpb in curve:
        if bpb <= level:
            t0, b0 = previous
            return float(tokens if not np.isfinite(b0) else t0 + (tokens - t0) * (b0 - level) / (b0 - bpb))
        previous = (tokens, bpb)
    return None


def run_setting(name: str, corpus: dict[str, pa.Table], target: str, methods: list[str], scale: Scale,
                device: str, workdir: Path) -> dict[str, Any]:
    folder = workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pool = corpus["pool"]
    if name == "out_of_pool":
        pool = pool.filter(pc.not_equal(pool["domain"], target))
    target_file = folder / "target.jsonl"
    target_file.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n"
                                   for r in corpus["target"].select(["id", "text"]).to_pylist()))
    sample = pool.take(np.argsort(id_keys(pool["id"], seed=4))[:5000])["text"].to_pylist()
    tokenizer = train_tokenizer(sample, scale.vocab_size, folder / "tokenizer")
    encoded = tokenizer(pool["text"].to_pylist(), add_special_tokens=False, return_attention_mask=False)
    tokens = np.array([len(ids) + 1 for ids in encoded["input_ids"]])
    budget = int(scale.budget_fraction * tokens.sum())
    ties = id_keys(pool["id"], seed=5)
    domains = pool["domain"].to_numpy(zero_copy_only=False)

    results = {}
    for method in methods:
        start = time.perf_counter()
        step = make_step(method, target_file, scale, device, folder / "scratch")
        if method == "oracle":  # every target-domain piece first: a perfect domain filter
            keys, counters = (domains == target).astype(np.float64), {}
        else:
            keys, counters = ranking_keys(step, pool, shard_rows=max(1, pool.num_rows // 4))
        seconds = time.perf_counter() - start
        rows = take_budget(keys, ties, tokens, budget)
        records, within = train_on(pool.take(rows), corpus["heldout"], tokenizer, folder / "tokenizer", scale, device,
                           folder / method)
        final = records[-1]
        others = [v for k, v in final.items() if k.startswith("bpb/") and k != f"bpb/{target}"]
        results[method] = {
            "selection_seconds": round(seconds, 2),
            "proxy_flops": counters.get("proxy_flops", 0),
            "selected_tokens": int(tokens[rows].sum()),
            "target_share": round(float(tokens[rows][domains[rows] == target].sum() / tokens[rows].sum()), 4),
            "curve": {"complete_runs": [(r["tokens"], round(r[f"bpb/{target}"], 4)) for r in records],
                      "within_run": [(r["tokens"], round(r[f"bpb/{target}"], 4)) for r in within]},
            "final_target_bpb": round(final[f"bpb/{target}"], 4),
            "other_domains_bpb": round(float(np.mean(others)), 4),
        }
        print(f"[data_efficiency] {name} {method}: target bpb {results[method]['final_target_bpb']}, "
              f"selection {seconds:.1f}s", file=sys.stderr)
    if "random" in results:
        level, total = results["random"]["final_target_bpb"], scale.steps * scale.batch_size * scale.seq_len
        for r in results.values():
            reached = {view: tokens_to_reach(curve, level) for view, curve in r["curve"].items()}
            r["tokens_to_random_final"] = reached
            r["token_ratio"] = {view: round(t / total, 4) if t is not None else None for view, t in reached.items()}
    return {"pool_docs": pool.num_rows, "pool_tokens": int(tokens.sum()), "budget_tokens": budget,
            "methods": results}


def plot(settings: dict[str, Any], target: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, (name, setting) in zip(axes[0], settings.items()):
        for method, r in setting["methods"].items():
            tokens, bpb = zip(*r["curve"]["complete_runs"])
            line, = ax.plot(tokens, bpb, marker="o", label=method, linewidth=2.5 if method == "random" else 1.5,
                            color="black" if method == "random" else None)
            if r["curve"]["within_run"]:
                tokens, bpb = zip(*r["curve"]["within_run"])
                ax.plot(tokens, bpb, linestyle="--", linewidth=1, color=line.get_color(), alpha=0.7)
        ax.set(title=f"{name.replace('_', ' ')}: target {target}", xlabel="training tokens (one run each)", xscale="log",
               ylabel=f"{target} bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", default="cpu", help="torch device for proxies and training (cpu, cuda)")
    parser.add_argument("--target", default="python_docs", help="target domain (a <domain>.jsonl of the corpus)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="selection methods (default: all but oracle, which reads the domain labels: "
                        "a perfect domain filter, for reference)")
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("TOKENMILL_CORPUS",
                                                                            "/tmp/tokenmill-corpus/out")),
                        help="folder of <domain>.jsonl(.gz) files (default: $TOKENMILL_CORPUS or the build "
                        "script's output)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tokenmill-data-efficiency"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: WORKDIR/data_efficiency.png)")
    args = parser.parse_args(argv)

    corpus_dir = args.corpus
    if not any(path.name.split(".jsonl")[0] == args.target for path in corpus_files(corpus_dir)):
        sys.exit(f"no {args.target}.jsonl(.gz) in {corpus_dir}: build the corpus (bash ../shared/corpora/build_corpus.sh) "
                 "or set TOKENMILL_CORPUS")
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    start = time.perf_counter()
    corpus = load_corpus(corpus_dir, args.target, scale)
    settings = {name: run_setting(name, corpus, args.target, args.methods, scale, args.device, args.workdir)
                for name in args.settings}
    plot_path = args.plot or args.workdir / "data_efficiency.png"
    plot(settings, args.target, plot_path)
    best = {name: {view: min((r["token_ratio"][view] for m, r in s["methods"].items()
                              if m not in ("random", "oracle") and r.get("token_ratio", {}).get(view)),
                             default=None)
                   for view in ("complete_runs", "within_run")} for name, s in settings.items()}
    print(json.dumps({
        "benchmark": "data_efficiency", "scale": args.scale, "device": args.device, "target": args.target,
        "corpus": str(corpus_dir), "heldout_target_docs": scale.heldout_docs, "target_docs": scale.target_docs,
        "train_tokens": scale.steps * scale.batch_size * scale.seq_len,
        "best_token_ratio_vs_random": best, "bar": {"in_pool": 0.1, "out_of_pool": 0.5},
        "settings": settings, "plot": str(plot_path), "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
