"""Evaluations of a trained run folder, as ``tokenmill eval`` runs them after (or long after) training.

Each writes a JSON file into ``RUN/eval/`` beside ``bpb.json``, where the run report and
``tokenmill compare`` find it:

- ``bpb.json``: bits per byte per domain of the held-out documents, as the run's eval stage writes it;
- ``harness.json``: lm-evaluation-harness results on ``RUN/model`` and the options they were run with;
- ``membership.json``: how well Min-K% Prob, perplexity and zlib tell texts the model trained on from
  texts it never saw (AUC, TPR at 5% FPR), and where those texts came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill import TokenmillError
from tokenmill.console import text_table
from tokenmill.documents.shards import list_shards
from tokenmill.evaluate.membership import MembershipConfig, membership_report
from tokenmill.files import read_json, write_json_atomic
from tokenmill.model.bpb import bits_per_byte
from tokenmill.model.hf import import_hf
from tokenmill.recipe import Recipe, parse_recipe, read_yaml
from tokenmill.runfolder import BpbResult, RunFolder, harness_rows, membership_source
from tokenmill.tokens.tokenizer import load_tokenizer
from tokenmill.train.device import resolve_device


def model_dir(run: Path) -> Path:
    """``RUN/model``, the Hugging Face export every evaluation here loads."""
    model = RunFolder(run).require().model
    if not (model / "config.json").is_file():
        raise TokenmillError(f"{run}: run folder without a model ({model}/config.json is missing); finish the "
                             f"run with `tokenmill run` (its export stage writes model/) and evaluate again")
    return model


def eval_bpb(run: Path, progress: bool | None = None) -> BpbResult:
    """Compute ``RUN/eval/bpb.json`` from ``RUN/model`` with the recipe's eval settings; return it. The run's
    eval stage and ``tokenmill eval --bpb`` both come here."""
    folder = RunFolder(run)
    recipe = load_run_recipe(run)
    if recipe.model.objective != "clm":
        raise TokenmillError(f"{run}: bits per byte scores a decoder, and this run trains objective "
                             f"{recipe.model.objective}; its figures come from `tokenmill eval {run} --objective`")
    model, tokenizer = _load_model(run)
    device = resolve_device("auto")
    result = BpbResult.model_validate(
        bits_per_byte(model.to(device), tokenizer, pq.read_table(folder.heldout), seq_len=recipe.train.seq_len,
                      batch_size=recipe.eval.batch_size, device=device,
                      max_docs_per_domain=recipe.eval.max_docs_per_domain, progress=progress))
    result.write(folder.bpb)
    return result


def load_run_recipe(run: Path) -> Recipe:
    """The recipe a run folder was made with, validated against today's schema (new fields take defaults)."""
    folder = RunFolder(run).require()
    return parse_recipe(read_yaml(folder.recipe), str(folder.recipe))


def eval_harness(run: Path, tasks: list[str] | None = None, *, task_dir: Path | None = None,
                 backend: str = "tokenmill", limit: int | None = None, num_fewshot: int | None = None,
                 log_samples: bool = False, output_path: Path | None = None, batch_size: int = 8) -> dict:
    """Run lm-evaluation-harness ``tasks`` (default: the bundled ones) on ``RUN/model``; merge them into
    ``RUN/eval/harness.json`` (keyed by task, each with the options it was run with) and return that.

    ``log_samples`` needs ``output_path``, lm_eval's own output folder, which gets the per-item samples
    (harness.json keeps metrics only), as with lm_eval's command line."""
    model = model_dir(run)
    if num_fewshot is not None and num_fewshot < 0:
        raise TokenmillError(f"--num_fewshot must be 0 or more, got {num_fewshot}")
    if log_samples and output_path is None:
        raise TokenmillError("--log_samples needs --output_path, the folder lm-evaluation-harness writes the "
                             "per-item samples to")
    try:
        from tokenmill.evaluate.harness import HarnessConfig, merge_results, run_harness
    except ModuleNotFoundError as err:  # lm-eval is an optional extra
        raise TokenmillError(f"the harness needs lm-evaluation-harness, and {err.name!r} is not installed: "
                             f"pip install 'tokenmill[eval]'") from err
    tasks = tasks or HarnessConfig().tasks
    result = run_harness(model, tasks, task_dir, backend=backend, limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, device=str(resolve_device("auto")), log_samples=log_samples,
                         output_path=output_path)
    options = {"task_dir": str(task_dir) if task_dir else None, "backend": backend, "limit": limit,
               "num_fewshot": num_fewshot, "log_samples": log_samples,
               "output_path": str(output_path) if output_path else None}
    path = RunFolder(run).harness
    merged = merge_results(read_json(path), result, options)
    write_json_atomic(merged, path)
    return merged


def eval_membership(run: Path, members: list[str], nonmembers: list[str], source: dict,
                    cfg: MembershipConfig = MembershipConfig()) -> dict:
    """Score ``members`` against ``nonmembers`` with ``RUN/model``; write and return
    ``RUN/eval/membership.json``. ``source`` says where the texts came from (kept in the file)."""
    model, tokenizer = _load_model(run)
    device = resolve_device("auto")
    max_tokens = min(cfg.max_tokens, model.cfg.max_seq_len)  # never past the positions RoPE covers
    methods = membership_report(members, nonmembers, model.to(device), tokenizer, max_tokens=max_tokens,
                                batch_size=cfg.batch_size, k=cfg.k, device=device)
    result = {"methods": methods, "members": len(members), "nonmembers": len(nonmembers), "source": source,
              "k": cfg.k, "max_tokens": max_tokens}
    write_json_atomic(result, RunFolder(run).membership)
    return result


def read_texts(path: Path, field: str = "text") -> list[str]:
    """The ``field`` of every line of a JSON Lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TokenmillError(f"{path} does not exist: pass a JSON Lines file with one {{{field!r}: ...}} per line")
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TokenmillError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise TokenmillError(f"{path}:{lineno}: no non-empty string field {field!r}; name the text field "
                                 f"with --text-field")
        texts.append(text)
    if not texts:
        raise TokenmillError(f"{path} holds no texts")
    return texts


def auto_membership_texts(run: Path, n: int, seed: int = 0) -> tuple[list[str], list[str], dict]:
    """Up to ``n`` curated training documents and as many held-out ones, with the same count per domain so
    that a domain that is merely easy to predict cannot pass for memorised; drawn at random with ``seed``.

    Training documents whose text also occurs held out are left out (they have no true label). Returns
    the members, the non-members and a ``source`` record with the per-domain counts and how many
    epochs of the training tokens the model saw: below one, some "members" may never have been read.
    """
    folder = RunFolder(run).require()
    if not folder.final.is_file() or not folder.heldout.is_file():
        raise TokenmillError(f"{run}: --membership-auto needs the curated documents (curate/final.json) and the "
                             f"held-out ones (heldout/documents.parquet); pass --membership MEMBERS NONMEMBERS")
    heldout = _nonempty(pq.read_table(folder.heldout, columns=["text", "domain"]))
    train = _nonempty(pa.concat_tables(pq.read_table(p, columns=["text", "domain"])
                                       for p in list_shards(folder.curated_documents())))
    train = train.filter(pc.invert(pc.is_in(train.column("text"), value_set=heldout.column("text"))))
    train_counts, heldout_counts = (dict(zip(*np.unique(t.column("domain").to_numpy(zero_copy_only=False),
                                                        return_counts=True))) for t in (train, heldout))
    quota = _even_split(n, {d: min(train_counts[d], heldout_counts[d]) for d in train_counts if d in heldout_counts})
    if not sum(quota.values()):
        raise TokenmillError(f"{run}: no domain has both training and held-out documents to compare")
    rng = np.random.default_rng(seed)
    members = [t for d, k in quota.items() for t in _sample(train, d, k, rng)]
    nonmembers = [t for d, k in quota.items() for t in _sample(heldout, d, k, rng)]
    seen = (read_json(folder.summary) or {}).get("tokens")
    corpus = (read_json(folder.train_tokens / "meta.json") or {}).get("n_tokens")
    source = {"auto": {"per_domain": {d: int(k) for d, k in quota.items()}, "seed": seed,
                       "epochs_seen": seen / corpus if seen and corpus else None}}
    return members, nonmembers, source


def bpb_table(result: BpbResult) -> str:
    rows = [(d, s.bpb, s.docs, s.bytes) for d, s in sorted(result.domains.items())]
    rows += [("overall (pooled)", result.overall.bpb, result.overall.docs, result.overall.bytes),
             ("macro average", result.macro_bpb, None, None)]
    return text_table(["domain", "bits per byte", "docs", "bytes"], rows)


def harness_table(result: dict) -> str:
    return text_table(["task", "metric", "value", "± stderr", "better"],
                      [(t, m, v, s, "higher" if hib else "lower" if hib is not None else "")
                       for t, m, v, s, hib in harness_rows(result)])


def membership_table(result: dict) -> str:
    return f"{membership_source(result)}.\n" + text_table(
        ["method", "AUC", "TPR at 5% FPR"], [(m, r["auc"], r["tpr_at_5fpr"]) for m, r in result["methods"].items()])


def _load_model(run: Path):
    """tokenmill's Llama (in eval mode) and the tokenizer from ``RUN/model``. The evaluations here
    encode whole documents and window them to the model's context themselves, so the export's
    ``model_max_length`` (which makes transformers warn about long inputs) is lifted."""
    path = model_dir(run)
    tokenizer = load_tokenizer(path)
    tokenizer.model_max_length = int(1e30)
    return import_hf(path)[0].eval(), tokenizer


def _nonempty(table: pa.Table) -> pa.Table:
    return table.filter(pc.greater(pc.binary_length(table.column("text")), 0))


def _even_split(n: int, caps: dict[str, int]) -> dict[str, int]:
    """``n`` split over domains as evenly as their caps allow (smallest caps filled first)."""
    quota, left = {}, n
    for i, (domain, cap) in enumerate(sorted(caps.items(), key=lambda item: item[1])):
        quota[domain] = min(cap, left // (len(caps) - i))
        left -= quota[domain]
    return dict(sorted(quota.items()))


def _sample(table: pa.Table, domain: str, k: int, rng: np.random.Generator) -> list[str]:
    texts = table.filter(pc.equal(table.column("domain"), domain)).column("text")
    return texts.take(pa.array(rng.choice(len(texts), size=k, replace=False))).to_pylist()
