"""Encoders at equal training FLOPs: ELECTRA against a masked LM, by linear-probe accuracy and MLM bits per byte.

One encoder shape trains twice per seed on the same packed tokens of a few domains of the real corpus,
once as a masked LM (``objective: mlm``) and once as ELECTRA (``objective: electra``: the generator at
``electra.generator_size`` of the width plus the discriminator of this shape), each with the trainer
(``tokenmill.train.loop.train``), the same lr, warm-up share and cosine decay. Equal FLOPs: each arm's
training FLOPs per token are its model's ``flops_per_token`` (6N + attention; ELECTRA's count the
generator, and MaskedLM's its decoder at every position, as it computes it); the arm with more FLOPs per
token trains the scale's ``steps`` and the other proportionally more steps of the same batch (rounded),
so both spend the same compute (``total_flops`` of each is printed).

Measured on held-out pieces (documents split whole by id hash, as ``optimizers.py`` does), for each
seed and arm:

- probe: domain classification from the mean-pooled final hidden states of the encoder
  (``MaskedLM.encoder``; ``Electra.discriminator``, the model ELECTRA keeps) over each piece's first
  ``probe_tokens`` tokens, standardised, scikit-learn ``LogisticRegression``, stratified 5-fold CV (the
  same folds for every model); accuracy ± the std over folds (ddof 0), the majority-class baseline and
  the same probe on the untrained encoder beside it;
- mlm_bpb: masked-token loss of the held-out stream (pieces + EOS, cut into ``seq_len`` windows, masked
  as in training with fixed draws, the same masks for every model) in bits per byte: nats per masked
  token / ln 2 × text tokens per UTF-8 byte. For ELECTRA this is its generator's MLM (the discriminator
  predicts no tokens), a model a fraction of the MLM's width, so the two bpb are not a like-for-like
  comparison of the encoders;
- pll_bpb: pseudo-log-likelihood (Salazar et al. 2020: each token masked alone, scored with the rest of
  its window as context) of the first ``pll_tokens`` tokens of ``pll_pieces`` pieces per domain, bits
  per byte of those tokens; ELECTRA's again from its generator;
- ELECTRA's held-out replaced-token detection: loss, accuracy, and the accuracy of calling every token
  original (the share of tokens the generator left as they were).

The bar (DESIGN.md, encoders): ELECTRA's probe accuracy (mean over seeds and folds) ≥ MLM's. Prints one
JSON line (training lines go to stderr). On cores another process is using, pass ``--threads 1``:
oversubscribed OpenMP threads slowed one measured run about tenfold.

    PYTHONPATH=src python benchmarks/encoders.py                 # CPU: ~6 min on 2 idle cores, 2 seeds
    PYTHONPATH=src python benchmarks/encoders.py --device cuda   # GPU: the 20M preset shape, 2 seeds
    PYTHONPATH=src python benchmarks/encoders.py --smoke         # bundled demo corpus, seconds
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tokenizers import Tokenizer

from optimizers import SCALES as DATA_SCALES, Data, Scale, corpus_of, model_config, prepare, training_parser
from tokenmill.model.build import build_model
from tokenmill.model.encoder import Electra, MaskedLM, generator_shape
from tokenmill.model.llama import ModelConfig
from tokenmill.tokens.corruption import SPECIAL, mask_tokens, required_tokens
from tokenmill.tokens.tokenizer import load_tokenizer
from tokenmill.train.checkpoint import load_trained_model
from tokenmill.train.config import TrainConfig
from tokenmill.train.loop import train
from tokenmill.train.objectives import EVAL_G_OFFSET

ARMS = ("mlm", "electra")
BAR = "ELECTRA probe accuracy >= MLM's at equal FLOPs"


@dataclass(frozen=True)
class Encoders:
    data: Scale  # domains, split, vocabulary, shape (model), seq_len, batch, steps of the costlier arm;
    #              heldout_pieces is the probe's pieces per domain
    lr: float  # both arms' peak learning rate
    seeds: int
    probe_tokens: int  # each probe piece's first tokens, mean-pooled
    bpb_pieces: int  # held-out pieces per domain in the masked-token bpb stream
    pll_pieces: int  # pieces per domain scored by pseudo-log-likelihood
    pll_tokens: int  # tokens of each, from its start


SCALES = {
    # Technical documentation beside literary text: three of each, so pooled vocabulary alone does not
    # separate every pair.
    "cpu": Encoders(replace(DATA_SCALES["cpu"], domains=("bible", "fortunes", "shakespeare", "kernel_docs",
                                                         "manpages", "python_docs"),
                            train_chars=600_000, heldout_pieces=100, steps=400),
                    lr=2e-3, seeds=2, probe_tokens=64, bpb_pieces=40, pll_pieces=2, pll_tokens=64),
    "gpu": Encoders(replace(DATA_SCALES["gpu"], domains=("bible", "code", "fortunes", "kernel_docs", "manpages",
                                                         "python_docs", "shakespeare", "web_html"),
                            chunk_chars=2000, train_chars=20_000_000, heldout_pieces=200,
                            model=dict(preset="20M"), seq_len=512, batch_size=32, steps=3000),
                    lr=1e-3, seeds=2, probe_tokens=128, bpb_pieces=100, pll_pieces=4, pll_tokens=128),
    "smoke": Encoders(replace(DATA_SCALES["smoke"], heldout_pieces=10, steps=6),
                      lr=1e-2, seeds=2, probe_tokens=16, bpb_pieces=3, pll_pieces=1, pll_tokens=8),
}


def prepare_encoders(corpus: Path, scale: Scale, workdir: Path) -> Data:
    """``optimizers.prepare`` with the masked objectives' special tokens (<mask>, <cls>, <sep>, <pad>)
    in the tokenizer. ``train_tokenizer`` adds them after training, so the merges, and the packed
    tokens (packing encodes special-token text literally), are prepare's own."""
    return prepare(corpus, scale, workdir, extra_special=required_tokens("mlm", None))  # electra's: the same


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return build_model(cfg).flops_per_token(seq_len)


def train_arm(cfg: ModelConfig, scale: Encoders, data: Data, out: Path, device: str, steps: int,
              seed: int) -> tuple[torch.nn.Module, dict]:
    """One run from scratch (warm-up a tenth, cosine decay); the trained model (CPU, eval mode) and the
    trainer's summary."""
    d = scale.data
    tcfg = TrainConfig(
        seq_len=d.seq_len, micro_batch_size=d.batch_size, global_batch_tokens=d.batch_size * d.seq_len,
        max_steps=steps, lr=scale.lr, warmup_steps=max(1, steps // 10), schedule="cosine", device=device,
        seed=seed, optimizer={"name": "adamw"}, bpb_every=None, ckpt_every=steps, keep_last_k=1,
        log_every=max(1, steps // 10), eval_every=steps,
    )
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would resume instead of starting afresh
    with contextlib.redirect_stdout(sys.stderr):
        summary = train(cfg, tcfg, data.tokens, out, tokenizer_dir=data.tokenizer_dir, progress=False)
    model, _ = load_trained_model(out / "checkpoints")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return model, summary


@dataclass
class Heldout:
    """The held-out material every model is measured on, made once."""

    domains: np.ndarray  # [pieces] the probe's labels
    probe_ids: list[np.ndarray]  # each probe piece's first probe_tokens token ids
    windows: np.ndarray  # [N, seq_len] the bpb stream's windows
    inputs: np.ndarray  # [N, seq_len] masked as in training
    labels: np.ndarray  # [N, seq_len] original token at masked positions, -1 elsewhere
    tokens_per_byte: float  # text tokens per UTF-8 byte of the bpb pieces
    pll_ids: list[np.ndarray]  # pll windows
    pll_bytes: int  # UTF-8 bytes those tokens stand for
    mask_id: int


def make_heldout(data: Data, cfg: ModelConfig, scale: Encoders) -> Heldout:
    tokenizer = load_tokenizer(data.tokenizer_dir)
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.encode_special_tokens = True  # as packing encodes documents
    texts = data.heldout["text"].to_pylist()
    domains = np.array(data.heldout["domain"].to_pylist())
    ids = [np.array(e.ids, np.int64) for e in encoder.encode_batch(texts, add_special_tokens=False)]
    keep = [i for i, piece in enumerate(ids) if len(piece)]
    ids, texts, domains = [ids[i] for i in keep], [texts[i] for i in keep], domains[keep]
    rank = np.zeros(len(ids), np.int64)  # each piece's place within its domain (pieces come shuffled)
    for domain in np.unique(domains):
        rank[domains == domain] = np.arange((domains == domain).sum())

    bpb = [i for i in range(len(ids)) if rank[i] < scale.bpb_pieces]
    stream = np.concatenate([np.append(ids[i], data.eos_id) for i in bpb])
    seq = scale.data.seq_len
    windows = stream[: len(stream) // seq * seq].reshape(-1, seq)
    special = np.array(sorted(set(tokenizer.all_special_ids)), np.int64)
    mask_id = tokenizer.convert_tokens_to_ids(SPECIAL["mask"])
    inputs, labels = mask_tokens(windows, EVAL_G_OFFSET + np.arange(len(windows)), cfg.masking, seed=0,
                                 mask_id=mask_id, vocab_size=len(tokenizer), special_ids=special)
    tokens_per_byte = sum(len(ids[i]) for i in bpb) / sum(len(texts[i].encode()) for i in bpb)

    pll = [ids[i][: scale.pll_tokens] for i in range(len(ids)) if rank[i] < scale.pll_pieces]
    # Byte-level BPE: every character of a token's string stands for one byte of the text.
    pll_bytes = sum(len(t) for piece in pll for t in tokenizer.convert_ids_to_tokens(piece.tolist()))
    return Heldout(domains=domains, probe_ids=[piece[: scale.probe_tokens] for piece in ids], windows=windows,
                   inputs=inputs, labels=labels, tokens_per_byte=tokens_per_byte, pll_ids=pll, pll_bytes=pll_bytes,
                   mask_id=mask_id)


@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, pieces: list[np.ndarray], device: str) -> np.ndarray:
    """Mean over tokens of the encoder's final hidden states, one row per piece. Pieces of one length go
    through together (the encoders have no padding mask)."""
    out = np.zeros((len(pieces), encoder.cfg.dim), np.float32)
    lengths = np.array([len(p) for p in pieces])
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        for start in range(0, len(rows), 64):
            batch = rows[start:start + 64]
            x = torch.from_numpy(np.stack([pieces[i] for i in batch])).to(device)
            out[batch] = encoder(x).float().mean(1).cpu().numpy()
    return out


def probe(features: np.ndarray, labels: np.ndarray) -> dict:
    """Stratified 5-fold (fewer where a domain has fewer pieces) logistic-regression accuracy."""
    folds = int(min(5, np.unique(labels, return_counts=True)[1].min()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    scores = cross_val_score(classifier, features, labels, cv=cv)
    return {"accuracy": round(float(scores.mean()), 4), "fold_std": round(float(scores.std()), 4),
            "folds": [round(float(s), 4) for s in scores]}


@torch.no_grad()
def masked_nats(mlm: MaskedLM, held: Heldout, device: str) -> tuple[float, int]:
    """Summed nats over the masked positions of the held-out windows, and their count."""
    total, count = 0.0, 0
    for start in range(0, len(held.inputs), 32):
        x = torch.from_numpy(held.inputs[start:start + 32]).to(device)
        y = torch.from_numpy(held.labels[start:start + 32]).to(device)
        _, token_loss = mlm(x, y, reduction="none")
        total += float(token_loss.sum())
        count += int((y >= 0).sum())
    return total, count


@torch.no_grad()
def pll_bits(mlm: MaskedLM, held: Heldout, device: str) -> float:
    """Summed bits of every pll token with it alone masked, the rest of its window as context."""
    bits = 0.0
    for ids in held.pll_ids:
        n = len(ids)
        x = torch.from_numpy(ids).to(device).repeat(n, 1)
        x.fill_diagonal_(held.mask_id)
        logits, _ = mlm(x)
        logp = logits[torch.arange(n), torch.arange(n)].float().log_softmax(-1)
        bits -= float(logp[torch.arange(n), torch.from_numpy(ids).to(device)].sum()) / math.log(2)
    return bits


@torch.no_grad()
def rtd_heldout(model: Electra, held: Heldout, device: str) -> dict:
    """ELECTRA's replaced-token detection on the held-out windows, as ``Electra.forward`` makes its inputs
    (the generator's samples at the masked positions, seeded): mean BCE per token, accuracy, and the
    accuracy of calling every token original (the share the generator left unchanged)."""
    sampling = torch.Generator(device=device).manual_seed(0)
    bce, correct, unchanged, n = 0.0, 0, 0, 0
    for start in range(0, len(held.inputs), 32):
        x = torch.from_numpy(held.inputs[start:start + 32]).to(device)
        y = torch.from_numpy(held.labels[start:start + 32]).to(device)
        masked = y >= 0
        gen_logits = model.generator.predict(model.generator.encoder(x)[masked])[:, : model.cfg.vocab_size]
        replaced = x.clone()
        replaced[masked] = torch.multinomial(gen_logits.float().softmax(-1), 1, generator=sampling).squeeze(-1)
        targets = (replaced != torch.where(masked, y, x)).float()
        logits = model.rtd_logits(replaced).float()
        bce += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))
        correct += int(((logits > 0).float() == targets).sum())
        unchanged += int((targets == 0).sum())
        n += targets.numel()
    return {"rtd_loss": round(bce / n, 4), "rtd_accuracy": round(correct / n, 4),
            "all_original_accuracy": round(unchanged / n, 4)}


def measure(model: torch.nn.Module, arm: str, held: Heldout, device: str) -> dict:
    model = model.to(device).eval()
    encoder = model.encoder if arm == "mlm" else model.discriminator
    mlm = model if arm == "mlm" else model.generator
    features = pooled_features(encoder, held.probe_ids, device)
    nats, masked = masked_nats(mlm, held, device)
    result = {
        "probe": probe(features, held.domains),
        "mlm_bpb": round(nats / masked / math.log(2) * held.tokens_per_byte, 4),
        "mlm_nats_per_masked_token": round(nats / masked, 4),
        "pll_bpb": round(pll_bits(mlm, held, device) / held.pll_bytes, 4),
    }
    if arm == "electra":
        result["rtd_heldout"] = rtd_heldout(model, held, device)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__.splitlines()[0], "/tmp/tokenmill-encoders")
    parser.add_argument("--steps", type=int, default=None, help="override the costlier arm's steps")
    parser.add_argument("--seeds", type=int, default=None, help="override the scale's seeds")
    args = parser.parse_args(argv)

    name = "smoke" if args.smoke else "gpu" if args.preset or args.device.startswith("cuda") else "cpu"
    scale = SCALES[name]
    data_scale = replace(scale.data, steps=args.steps or scale.data.steps,
                         model=dict(preset=args.preset) if args.preset else scale.data.model)
    scale = replace(scale, data=data_scale, seeds=args.seeds or scale.seeds)
    corpus = corpus_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare_encoders(corpus, data_scale, args.workdir)
    tokenizer = load_tokenizer(data.tokenizer_dir)
    pad_id = tokenizer.convert_tokens_to_ids(SPECIAL["pad"])
    cfgs = {arm: model_config(data_scale, data, objective=arm, pad_id=pad_id) for arm in ARMS}
    fpt = {arm: flops_per_token(cfg, data_scale.seq_len) for arm, cfg in cfgs.items()}
    costlier = max(ARMS, key=fpt.get)
    cheaper = next(arm for arm in ARMS if arm != costlier)
    steps = {arm: round(data_scale.steps * fpt[costlier] / fpt[arm]) for arm in ARMS}
    tokens_per_step = data_scale.batch_size * data_scale.seq_len
    held = make_heldout(data, cfgs["mlm"], scale)

    torch.manual_seed(0)  # the trainer's init for seed 0: the untrained reference
    untrained = probe(pooled_features(build_model(cfgs["mlm"]).encoder.to(args.device).eval(), held.probe_ids,
                                      args.device), held.domains)
    runs = {arm: [] for arm in ARMS}
    for seed in range(scale.seeds):
        for arm in ARMS:
            t0 = time.perf_counter()
            model, summary = train_arm(cfgs[arm], scale, data, args.workdir / "runs" / f"{arm}-{seed}", args.device,
                                       steps[arm], seed)
            result = {"seed": seed, "final_train_loss": round(summary["final_loss"], 4),
                      "train_seconds": round(time.perf_counter() - t0, 1),
                      "train_tokens_per_s": round(summary["tokens_per_s"], 1), **measure(model, arm, held, args.device)}
            result["seconds"] = round(time.perf_counter() - t0, 1)
            runs[arm].append(result)
            print(f"[encoders] {arm} seed {seed}: probe {result['probe']['accuracy']:.4f}, mlm_bpb "
                  f"{result['mlm_bpb']:.4f}, {result['seconds']:.0f}s", file=sys.stderr)

    def mean(values) -> float:
        return round(float(np.mean(list(values))), 4)

    arms = {}
    for arm in ARMS:
        accuracies = [a for run in runs[arm] for a in run["probe"]["folds"]]
        arms[arm] = {
            "model": cfgs[arm].model_dump(include={"dim", "n_layers", "n_heads", "ffn_hidden", "vocab_size"}),
            "steps": steps[arm], "tokens": steps[arm] * tokens_per_step, "flops_per_token": fpt[arm],
            "total_flops": fpt[arm] * steps[arm] * tokens_per_step,
            "probe_accuracy": {"mean": round(float(np.mean(accuracies)), 4),
                               "fold_std": round(float(np.std(accuracies)), 4),
                               "per_seed": [run["probe"]["accuracy"] for run in runs[arm]]},
            "mlm_bpb": mean(r["mlm_bpb"] for r in runs[arm]), "pll_bpb": mean(r["pll_bpb"] for r in runs[arm]),
            "final_train_loss": mean(r["final_train_loss"] for r in runs[arm]),
            "seconds": round(sum(run["seconds"] for run in runs[arm]), 1),
            "runs": runs[arm],
        }
    gen_dim, gen_heads, gen_ffn = generator_shape(cfgs["electra"], cfgs["electra"].electra.generator_size)
    arms["electra"]["generator"] = {"dim": gen_dim, "n_heads": gen_heads, "ffn_hidden": gen_ffn,
                                    "n_layers": cfgs["electra"].n_layers,
                                    "size": cfgs["electra"].electra.generator_size}
    arms["electra"]["rtd_heldout"] = {key: mean(r["rtd_heldout"][key] for r in runs["electra"])
                                      for key in runs["electra"][0]["rtd_heldout"]}
    electra_acc, mlm_acc = arms["electra"]["probe_accuracy"]["mean"], arms["mlm"]["probe_accuracy"]["mean"]
    counts = np.unique(held.domains, return_counts=True)[1]
    print(json.dumps({
        "benchmark": "encoders", "scale": "smoke" if args.smoke else args.preset or name, "device": args.device,
        "corpus": str(corpus), "domains": list(data_scale.domains), "seq_len": data_scale.seq_len,
        "batch_size": data_scale.batch_size, "lr": scale.lr, "seeds": scale.seeds,
        "peer": "mlm",
        "equal_flops": f"{costlier} (more FLOPs per token) trains {steps[costlier]} steps, {cheaper} proportionally "
                       f"more ({steps[cheaper]})",
        "flops_ratio_electra_over_mlm": round(arms["electra"]["total_flops"] / arms["mlm"]["total_flops"], 4),
        "probe": {"pieces": len(held.domains), "tokens_per_piece": scale.probe_tokens,
                  "folds": len(runs["mlm"][0]["probe"]["folds"]),
                  "majority_baseline": round(float(counts.max() / counts.sum()), 4), "untrained_encoder": untrained},
        "mlm_bpb_of": {"mlm": "the model", "electra": "its generator (the discriminator predicts no tokens)"},
        "final_train_loss_of": {"mlm": "masked-token cross-entropy (nats)",
                                "electra": f"generator MLM + {cfgs['electra'].electra.discriminator_weight:g} x "
                                           "replaced-token BCE"},
        "heldout_masked_tokens": int((held.labels >= 0).sum()), "pll_tokens": int(sum(map(len, held.pll_ids))),
        "arms": arms,
        "electra_minus_mlm_probe_accuracy": round(electra_acc - mlm_acc, 4),
        "bar": BAR, "met": electra_acc >= mlm_acc,
        "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
