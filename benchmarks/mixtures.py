"""Mixtures, schedules and ordering at equal training tokens on the real corpus.

Every arm trains the same model for the same tokens on the same packed corpus (``optimizers.py``'s split,
tokenizer and training run); only how much of each domain it sees, when, and in what order differs:

* ``natural``: natural proportions (3 seeds: the noise every comparison is read against);
* ``uniform``: every domain alike;
* ``searched_macro`` / ``searched_pair``: RegMix/CLIMB search (``tokenmill.select.mixture_search``, the
  code ``tokenmill mix search`` runs) with small proxies at a fixed token budget; one set of proxies, one
  regressor per target: (a) the macro average of held-out bits per byte over all domains, (b) the mean
  over a named domain pair. Proxy compute (6·N·T plus attention, as ``compare`` charges) is printed;
* ``doremi``: DoReMi as the paper runs it: a small reference model on natural proportions, a small DoReMi
  proxy of the same size (domain losses weighted by the DRO weights against the reference's per-domain
  validation loss), then the final model on the proxy's mean weights; proxy compute printed;
* ``upsample_end``: natural for the first 80% of steps, then the pair's domains ×4;
* ``meco``: each document preceded by its domain name (no loss on it) for 90% of steps, then plain;
* ``related``: natural proportions, documents packed in nearest-neighbour chains (In-Context Pretraining).

Printed as one JSON line, per arm: final macro BPB, final pair BPB, mean BPB of the domains outside the
pair, per-domain BPB and the weights it trained with; for ``searched_*`` and ``meco`` the tokens to reach
natural's final target BPB from complete runs (own warm-up and decay) at ``--fractions`` of the tokens,
as ``data_efficiency.py`` measures, and from the full run's own curve; the search's Spearman rho on held-out
proxies per target; and the bars: searched ≤ 0.7× tokens on both targets with rho ≥ 0.8; end-of-training
upsampling lowers the pair's BPB with the macro average within the natural seeds' spread; MeCo ≤ 0.8×.

    PYTHONPATH=src python benchmarks/mixtures.py                # CPU: ~20 min on 2 cores
    PYTHONPATH=src python benchmarks/mixtures.py --device cuda --scale full
    PYTHONPATH=src python benchmarks/mixtures.py --smoke        # bundled demo corpus, seconds
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_efficiency import tokens_to_reach
from optimizers import SCALES as DATA_SCALES, Data, Scale, corpus_of, model_config, prepare, training_parser
from tokenmill.documents.shards import write_parquet_atomic
from tokenmill.model.llama import Llama, ModelConfig
from tokenmill.select import mixture_search as search
from tokenmill.tokens.pack import PackConfig, pack_documents
from tokenmill.tokens.tokenizer import load_tokenizer
from tokenmill.train.config import TrainConfig
from tokenmill.train.loop import train


@dataclass(frozen=True)
class Mixtures:
    data: Scale  # corpus split, model shape, seq_len, batch, steps and evaluations of every arm
    lr: float
    pair: tuple[str, str]  # the named target pair, also the domains end-of-training upsampling boosts
    proxy_model: dict  # the proxies' shape
    proxy_steps: int
    search: dict  # MixSearchConfig fields


SCALES = {
    "cpu": Mixtures(replace(DATA_SCALES["cpu"], steps=300, evals=10, train_chars=1_500_000), lr=3e-3,
                    pair=("manpages", "python_docs"), proxy_model=dict(dim=64, n_layers=2, n_heads=2),
                    proxy_steps=120, search=dict(proxies=24, rounds=2, proxies_per_round=6, candidates=20_000,
                                                     heldout_fraction=0.33)),
    "full": Mixtures(replace(DATA_SCALES["gpu"], steps=3000, model=dict(dim=512, n_layers=8, n_heads=8)), lr=1.5e-3,
                     pair=("manpages", "python_docs"), proxy_model=dict(dim=256, n_layers=2, n_heads=4),
                     proxy_steps=1000, search=dict(proxies=48, rounds=3, proxies_per_round=12)),
    "smoke": Mixtures(replace(DATA_SCALES["smoke"], steps=8, evals=2), lr=1e-2, pair=("python_docs", "shakespeare"),
                      proxy_model=dict(dim=16, n_layers=1, n_heads=2), proxy_steps=3,
                      search=dict(proxies=5, rounds=2, proxies_per_round=2, candidates=200, top_k=10)),
}
ARMS = ("uniform", "searched_macro", "searched_pair", "doremi", "upsample_end", "meco", "related")
BARS = {"searched_token_ratio": 0.7, "rho": 0.8, "meco_token_ratio": 0.8}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return Llama(cfg).flops_per_token(seq_len)


def run(model_cfg: ModelConfig, scale: Scale, data: Data, out: Path, device: str, *, lr: float, steps: int,
        evals: int, seed: int = 0, tokens: Path | None = None, val_tokens: Path | None = None,
        **train_fields: Any) -> dict[str, Any]:
    """One complete run from scratch; its per-domain held-out BPB at each evaluation and its summary."""
    cfg = TrainConfig(
        seq_len=scale.seq_len, micro_batch_size=scale.batch_size, global_batch_tokens=scale.batch_size * scale.seq_len,
        max_steps=steps, lr=lr, warmup_steps=max(1, steps // 10), schedule="cosine", device=device, seed=seed,
        bpb_every=max(1, steps // evals), bpb_docs_per_domain=scale.heldout_pieces, ckpt_every=steps, keep_last_k=1,
        log_every=max(1, steps // evals), eval_every=steps, eval_windows_per_domain=scale.heldout_pieces,
        **train_fields)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = train(model_cfg, cfg, tokens or data.tokens, out, val_tokens_dir=val_tokens, bpb_docs=data.heldout,
                        tokenizer_dir=data.tokenizer_dir, progress=False)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals_ = [(r["tokens"], {k.partition("/")[2]: v for k, v in r.items() if k.startswith("bpb/")})
              for r in records if "bpb" in r]
    return {"evals": evals_, "summary": summary, "seconds": time.perf_counter() - t0,
            "flops": flops_per_token(model_cfg, scale.seq_len) * summary["tokens"]}


def target_of(per_domain: dict[str, float], domains: list[str]) -> float:
    return float(np.mean([per_domain[d] for d in domains]))


def curve(result: dict, domains: list[str]) -> list[tuple[int, float]]:
    return [(tokens, target_of(bpb, domains)) for tokens, bpb in result["evals"]]


def final(result: dict) -> dict[str, float]:
    return result["evals"][-1][1]


def mix_search(setting: Mixtures, scale: Scale, data: Data, domains: list[str], natural: np.ndarray,
               targets: dict[str, list[str]], workdir: Path, device: str) -> dict[str, Any]:
    """RegMix/CLIMB rounds with one set of proxies and one regressor per target; the best mixture per
    target, the held-out proxies' Spearman rho per target, and the proxies' compute."""
    cfg = search.MixSearchConfig(**setting.search, proxy_steps=setting.proxy_steps, seed=0)
    proxy_cfg = model_config(scale, data, **setting.proxy_model)
    proxy_scale = replace(scale, heldout_pieces=scale.heldout_pieces)
    measured: list[tuple[search.Planned, dict[str, float]]] = []
    flops = seconds = 0.0

    def train_proxies(planned: list[search.Planned]) -> None:
        nonlocal flops, seconds
        for p in planned:
            i = len(measured)
            weights = {d: float(w) for d, w in zip(domains, p.weights)}
            result = run(proxy_cfg, proxy_scale, data, workdir / "proxies" / f"p{i:03d}", device, lr=setting.lr,
                         steps=setting.proxy_steps, evals=1, domain_weights=weights)
            flops, seconds = flops + result["flops"], seconds + result["seconds"]
            measured.append((p, final(result)))

    train_proxies(search.first_round(natural, cfg))
    heldout = [i for i, (p, _) in enumerate(measured) if p.kind == "heldout"]
    fitted = [i for i in range(len(measured)) if i not in heldout]
    rho = {}
    for name, target in targets.items():
        x = np.array([measured[i][0].weights for i in fitted])
        y = np.array([target_of(measured[i][1], target) for i in fitted])
        model = search.fit_regressor(x, y, cfg.regressor, cfg.seed)
        rho[name] = search.spearman_rho(
            search.predict(model, np.array([measured[i][0].weights for i in heldout])).tolist(),
            [target_of(measured[i][1], target) for i in heldout])
    best = {}
    for round_index in range(1, cfg.rounds + 1):
        for name, target in targets.items():
            x = np.array([p.weights for p, _ in measured])
            y = np.array([target_of(m, target) for _, m in measured])
            model = search.fit_regressor(x, y, cfg.regressor, cfg.seed)
            if round_index == cfg.rounds:
                best[name] = search.best_mixture(model, natural, cfg)
            else:  # the next round's proxies split between the targets
                chosen = search.choose_next_round(model, natural, x, cfg, round_index)
                train_proxies(chosen[: max(1, len(chosen) // len(targets))])
    return {
        "proxies": len(measured), "proxy_model": setting.proxy_model, "proxy_steps": setting.proxy_steps,
        "proxy_tokens_each": setting.proxy_steps * scale.batch_size * scale.seq_len,
        "proxy_flops": flops, "proxy_seconds": round(seconds, 1), "rho_heldout": rho, "heldout_proxies": len(heldout),
        "best": {name: {"weights": dict(zip(domains, np.round(w, 4).tolist())), "predicted": round(pred, 4)}
                 for name, (w, pred) in best.items()},
        "table": [{"kind": p.kind, "weights": np.round(p.weights, 4).tolist(),
                   **{name: round(target_of(m, t), 4) for name, t in targets.items()}} for p, m in measured],
    }


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__.splitlines()[0], "/tmp/tokenmill-mixtures")
    parser.add_argument("--scale", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 0.8],
                        help="shares of the tokens of the complete shorter runs of the searched and MeCo arms")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the natural arm (the noise)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="arms to train beside natural (default: all); searched_* share one search")
    args = parser.parse_args(argv)
    setting = SCALES["smoke" if args.smoke else args.scale]
    scale = setting.data
    corpus = corpus_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = args.workdir
    data = prepare(corpus, scale, work)
    cfg = model_config(scale, data)
    domains = sorted(scale.domains)
    pair = list(setting.pair)
    others = [d for d in domains if d not in pair]
    targets = {"macro": domains, "pair": pair}

    # held-out tokens (DoReMi's reference loss) and the related-order pack of the same documents
    write_parquet_atomic(data.heldout, work / "data" / "heldout" / "shard-00000.parquet")
    tokenizer = load_tokenizer(data.tokenizer_dir)
    pack_documents([work / "data" / "heldout" / "shard-00000.parquet"], tokenizer, work / "data" / "heldout-tokens",
                   workers=1)
    if "related" in args.arms:
        related_config = PackConfig(order="related", order_by="embedding", embedding_backend="tfidf")
        pack_documents([work / "data" / "docs" / "shard-00000.parquet"], tokenizer, work / "data" / "related-tokens",
                       workers=1, config=related_config)
    meta = json.loads((data.tokens / "meta.json").read_text())
    natural = np.array([meta["domains"][d]["tokens"] for d in domains], float)
    natural /= natural.sum()

    steps = scale.steps
    common = dict(lr=setting.lr, steps=steps, evals=scale.evals)
    arms: dict[str, dict] = {}
    arm_settings: dict[str, Any] = {}

    def arm(name: str, **fields: Any) -> None:
        if name in args.arms:
            arms[name] = run(cfg, scale, data, work / name, args.device, **common, **fields)
            arm_settings[name] = {k: v for k, v in fields.items() if k not in ("tokens", "val_tokens")}

    naturals = [run(cfg, scale, data, work / f"natural-seed{s}", args.device, **common, seed=s,
                    val_tokens=work / "data" / "heldout-tokens") for s in range(args.seeds)]
    arms["natural"] = naturals[0]
    arm("uniform", domain_weights={d: 1.0 for d in domains})
    found = None
    if {"searched_macro", "searched_pair"} & set(args.arms):
        found = mix_search(setting, scale, data, domains, natural, targets, work / "search", args.device)
        for name in targets:
            arm(f"searched_{name}", domain_weights=found["best"][name]["weights"])
    if "doremi" in args.arms:
        proxy_cfg = model_config(scale, data, **setting.proxy_model)
        reference = run(proxy_cfg, scale, data, work / "doremi-reference", args.device, **common,
                        val_tokens=work / "data" / "heldout-tokens")
        doremi_proxy = run(proxy_cfg, scale, data, work / "doremi-proxy", args.device, **common,
                           mixture={"online": "doremi", "doremi": {"reference": str(work / "doremi-reference")}})
        arm("doremi", domain_weights=doremi_proxy["summary"]["doremi_mean_weights"])
    arm("upsample_end", mixture={"phases": [{"until": 0.8}, {"until": 1.0, "upsample": {d: 4.0 for d in pair}}]})
    arm("meco", metadata={"field": "domain", "cooldown_fraction": 0.1})
    arm("related", tokens=work / "data" / "related-tokens")

    # complete shorter runs of the arms with a token bar, and natural's final target BPB they must reach
    natural_final = {name: target_of(final(naturals[0]), t) for name, t in targets.items()}
    complete: dict[str, dict[str, list]] = {}
    for name, target_names in (("searched_macro", ["macro"]), ("searched_pair", ["pair"]), ("meco", ["macro"])):
        if name not in arms:
            continue
        points = []
        for fraction in args.fractions:
            short = run(cfg, scale, data, work / f"{name}-{fraction}", args.device, lr=setting.lr,
                        steps=max(1, round(fraction * steps)), evals=1,
                        **{k: v for k, v in arm_settings[name].items()})
            points.append((short["summary"]["tokens"], final(short)))
        points.append((arms[name]["summary"]["tokens"], final(arms[name])))
        complete[name] = {t: [(tok, round(target_of(bpb, targets[t]), 4)) for tok, bpb in points] for t in target_names}

    total_tokens = arms["natural"]["summary"]["tokens"]
    macro_seeds = [target_of(final(r), domains) for r in naturals]
    pair_seeds = [target_of(final(r), pair) for r in naturals]

    def ratio(reached: float | None) -> float | None:
        return round(reached / total_tokens, 4) if reached is not None else None

    def summary(name: str, result: dict) -> dict:
        per_domain = final(result)
        row = {"final_macro_bpb": round(target_of(per_domain, domains), 4),
               "final_pair_bpb": round(target_of(per_domain, pair), 4),
               "others_mean_bpb": round(target_of(per_domain, others), 4) if others else None,
               "per_domain_bpb": {d: round(v, 4) for d, v in per_domain.items()},
               "within_run_token_ratio": {t: ratio(tokens_to_reach(curve(result, targets[t]), natural_final[t]))
                                          for t in targets},
               "seconds": round(result["seconds"], 1)}
        if name in complete:
            row["complete_runs"] = complete[name]
            row["token_ratio"] = {t: ratio(tokens_to_reach(points, natural_final[t])) for t, points in complete[name].items()}
        return row

    rows = {name: summary(name, result) for name, result in arms.items()}
    rows["natural"]["weights"] = dict(zip(domains, np.round(natural, 4).tolist()))
    met = {}
    if found is not None:
        for name in targets:
            if f"searched_{name}" in rows:
                rows[f"searched_{name}"]["weights"] = found["best"][name]["weights"]
                ratio_ = rows[f"searched_{name}"]["token_ratio"][name]
                met[f"searched_{name}"] = ratio_ is not None and ratio_ <= BARS["searched_token_ratio"]
        met["rho"] = all(r is not None and round(r, 4) >= BARS["rho"] for r in found["rho_heldout"].values())
    if "doremi" in rows:
        rows["doremi"]["weights"] = doremi_proxy["summary"]["doremi_mean_weights"]
        rows["doremi"]["proxy_flops"] = reference["flops"] + doremi_proxy["flops"]
        rows["doremi"]["proxy_seconds"] = round(reference["seconds"] + doremi_proxy["seconds"], 1)
    spread = {"macro": [round(min(macro_seeds), 4), round(max(macro_seeds), 4)],
              "pair": [round(min(pair_seeds), 4), round(max(pair_seeds), 4)], "seeds": args.seeds}
    if "upsample_end" in rows:
        up, width = rows["upsample_end"], max(macro_seeds) - min(macro_seeds)
        met["upsample_end_pair_better"] = up["final_pair_bpb"] < min(pair_seeds)
        met["upsample_end_macro_within_noise"] = min(macro_seeds) - width <= up["final_macro_bpb"] <= max(macro_seeds) + width
    if "meco" in rows:
        met["meco"] = (rows["meco"]["token_ratio"]["macro"] or 9) <= BARS["meco_token_ratio"]
    print(json.dumps({
        "benchmark": "mixtures", "scale": "smoke" if args.smoke else args.scale, "device": args.device,
        "corpus": str(corpus), "domains": domains, "pair": pair, "peer": "natural",
        "model": cfg.model_dump(include={"dim", "n_layers", "n_heads", "vocab_size"}), "seq_len": scale.seq_len,
        "batch_size": scale.batch_size, "steps": steps, "tokens": total_tokens, "lr": setting.lr,
        "natural_final": {t: round(v, 4) for t, v in natural_final.items()}, "natural_seed_spread": spread,
        "search": {k: v for k, v in found.items() if k != "table"} if found else None,
        "proxies": found["table"] if found else None,
        "arms": rows, "bars": BARS, "met": met, "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
