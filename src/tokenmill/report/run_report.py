"""The run report: one HTML file, readable offline, that shows what every stage of a run did.

Everything is inline (CSS, plots as base64 PNG) so the file can be mailed or archived alone. Each
section reads the files its stage leaves in the run folder and says "not run" when they are absent, so
the report also serves a run that stopped half-way. Text from the data is always HTML-escaped.
"""

from __future__ import annotations

import statistics
from html import escape
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from tokenmill.files import read_json
from tokenmill.report.page import not_run, png, table, write_page
from tokenmill.runfolder import (
    BpbResult,
    ObjectiveResult,
    RunFolder,
    StepStats,
    harness_rows,
    membership_source,
)


def write_report(run_dir: Path) -> Path:
    """Build ``run_dir/report.html`` from whatever stages have run; returns its path."""
    f = RunFolder(run_dir).require()
    timings = read_json(f.timings)
    bodies = {
        "recipe": _recipe(f.recipe),
        "timings": _timings(timings),
        "curation": _curation([step.read_stats() for step in f.steps()]),
        "tokens": _tokens(read_json(f.train_tokens / "meta.json")),
        "training": _training(f.read_metrics(), timings, read_json(f.summary)),
        "mixture": _mixture(f.read_metrics(), read_json(f.summary)),
        "evaluation": (_model_evaluation(f) + _harness(read_json(f.harness))
                       + _membership(read_json(f.membership))),
        "model": _model(f.model, _objective_of(f)),
    }
    return write_page(f.report, f"tokenmill run {f.root.resolve().name}", bodies)


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


# ---- sections -------------------------------------------------------------------------------------


def _recipe(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return f"<details><summary>recipe.yaml (as run)</summary><pre>{escape(text)}</pre></details>"


def _timings(timings: dict | None) -> str:
    if timings is None:
        return not_run("timings.json")
    rows = [(stage, float(seconds)) for stage, seconds in timings.items()]
    return table(["stage", "seconds"], rows, total=["total", sum(s for _, s in rows)])


def _curation(stages: list[StepStats]) -> str:
    if not stages:
        return not_run("curate/*/stats.json")
    first = stages[0]
    funnel = table(
        ["stage", "docs in", "docs removed", "docs kept", "kept of input", "bytes kept", "bytes kept of input",
         "seconds"],
        [
            (s.step, s.input_docs, s.removed_docs, s.kept_docs, _percent(s.kept_docs, first.input_docs),
             s.kept_bytes, _percent(s.kept_bytes, first.input_bytes), float(s.seconds))
            for s in stages
        ],
    )
    reasons = [
        (s.step, reason, count, _percent(count, s.input_docs))
        for s in stages
        for reason, count in sorted(s.removed.items(), key=lambda item: (-item[1], item[0]))
    ]
    counters = [(s.step, name, value) for s in stages for name, value in sorted(s.counters.items())]
    return (
        "<h3>Funnel</h3>" + funnel + _funnel_plot(stages)
        + "<h3>Removed, by reason</h3>"
        + (table(["stage", "reason", "documents", "of stage input"], reasons) if reasons else "<p>Nothing removed.</p>")
        + (("<h3>Other events</h3>" + table(["stage", "counter", "count"], counters)) if counters else "")
    )


def _funnel_plot(stages: list[StepStats]) -> str:
    names = ["input"] + [s.step for s in stages]
    docs = [stages[0].input_docs] + [s.kept_docs for s in stages]
    megabytes = [stages[0].input_bytes / 1e6] + [s.kept_bytes / 1e6 for s in stages]
    fig = Figure(figsize=(10, 0.45 * len(names) + 1.2))
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, values, label in ((left, docs, "documents"), (right, megabytes, "MB of text")):
        ax.bar_label(ax.barh(names, values, color="#4c78a8"), fmt="{:,.0f}" if label == "documents" else "{:,.1f}",
                     padding=3, fontsize="small")
        ax.margins(x=0.15)
        ax.set_xlabel(f"{label} after stage")
    left.invert_yaxis()
    return png(fig)


def _tokens(meta: dict | None) -> str:
    if meta is None:
        return not_run("tokens/train/meta.json")
    domains = sorted(meta["domains"].items(), key=lambda item: -item[1]["tokens"])
    total = meta["n_tokens"]
    rows = [(d, s["docs"], s["tokens"], _percent(s["tokens"], total), s["tokens"] / max(s["docs"], 1))
            for d, s in domains]
    summary = f"<p>{total:,} tokens, vocabulary of {meta['vocab_size']:,}.</p>"
    fig = Figure(figsize=(8, 0.4 * len(domains) + 1.2))
    ax = fig.subplots()
    ax.barh([d for d, _ in domains], [s["tokens"] for _, s in domains], color="#59a14f")
    ax.invert_yaxis()
    ax.set_xlabel("tokens")
    return summary + table(["domain", "docs", "tokens", "share", "tokens per doc"], rows) + png(fig)


def _training(metrics: list[dict] | None, timings: dict | None, summary: dict | None = None) -> str:
    """Loss curves (and held-out bits per byte, when the trainer measured it) against tokens seen;
    throughput and MFU are medians of the logged ``tokens_per_s`` and ``mfu`` (robust to the compile
    warm-up), throughput failing that tokens over the train stage's time; memory from the summary."""
    if metrics is None:
        return not_run("train/metrics.jsonl")
    train = [(m["tokens"], m["loss"]) for m in metrics if "loss" in m]
    val, val_keys = _curve_records(metrics, "val_loss")
    bpb, bpb_keys = _curve_records(metrics, "bpb")
    tokens_seen = max((m["tokens"] for m in metrics if "tokens" in m), default=0)
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    train_seconds = (timings or {}).get("train")
    speed = statistics.median(speeds) if speeds else tokens_seen / train_seconds if train_seconds else None
    mfus = [m["mfu"] for m in metrics if m.get("mfu") is not None]
    figures = [("tokens seen", tokens_seen), ("tokens/s", speed), ("MFU", statistics.median(mfus) if mfus else None),
               ("final train loss", float(train[-1][1]) if train else None)]
    figures += [(_curve_label(key, "final validation loss"), float(val[-1][key])) for key in val_keys
                if key in val[-1]]
    figures += [(_curve_label(key, "final held-out bits per byte"), float(bpb[-1][key])) for key in bpb_keys
                if key in bpb[-1]]
    memory = (summary or {}).get("memory") or {}
    figures += [(label, f"{memory[key] / 2**20:,.1f} MiB") for key, label in (
        ("param_bytes", "parameters (per device)"), ("grad_bytes", "gradients (per device)"),
        ("optimizer_state_bytes", "optimizer state (per device)"),
        ("peak_bytes", "peak memory (" + memory.get("peak_kind", "").replace("_", " ") + ")")) if key in memory]
    if not (train or val):
        return table(["figure", "value"], figures) + "<p>No losses logged yet.</p>"
    fig = Figure(figsize=(14 if bpb else 9, 4.5))
    axes = fig.subplots(1, 2 if bpb else 1, squeeze=False)[0]
    if train:
        axes[0].plot(*zip(*train), label="train", color="#9aa5b1", linewidth=1)
    _plot_curves(axes[0], val, val_keys, "validation", "loss (nats per token)")
    if bpb:
        _plot_curves(axes[1], bpb, bpb_keys, "held-out", "bits per byte")
    return table(["figure", "value"], figures) + png(fig)


def _mixture(metrics: list[dict] | None, summary: dict | None) -> str:
    """The mixture training realised, per metric line (each domain's share of the sequences since the
    previous line), and DoReMi's domain weights step by step when it ran."""
    if metrics is None:
        return not_run("train/metrics.jsonl")
    realised, domains = _family(metrics, "mix")
    weights, weighted = _family(metrics, "weight")
    if not realised:
        return "<p>No realised mixture logged (runs before this report version did not log it).</p>"
    fig = Figure(figsize=(14 if weights else 8, 4))
    axes = fig.subplots(1, 2 if weights else 1, squeeze=False)[0]
    axes[0].stackplot([m["tokens"] for m in realised], *[[m.get(k, 0.0) for m in realised] for k in domains],
                      labels=[k.partition("/")[2] for k in domains], step="pre")
    axes[0].set(xlabel="tokens", ylabel="share of sequences", ylim=(0, 1), title="realised mixture")
    axes[0].legend(fontsize="small", loc="upper left")
    rows = [(k.partition("/")[2], sum(m.get(k, 0.0) for m in realised) / len(realised)) for k in domains]
    headers = ["domain", "mean realised share"]
    if weights:
        for k in weighted:
            axes[1].plot([m["tokens"] for m in weights], [m[k] for m in weights], label=k.partition("/")[2])
        axes[1].set(xlabel="tokens", ylabel="sampling weight", title="DoReMi weights")
        axes[1].legend(fontsize="small")
        mean = (summary or {}).get("doremi_mean_weights") or {}
        rows = [(d, share, mean.get(d)) for d, share in rows]
        headers.append("DoReMi mean weight")
    return table(headers, rows) + png(fig)


def _family(metrics: list[dict], family: str) -> tuple[list[dict], list[str]]:
    """The records with keys ``family/<domain>``, and those keys."""
    keys = sorted({k for m in metrics for k in m if k.startswith(f"{family}/")})
    return [m for m in metrics if any(k in m for k in keys)], keys


def _curve_records(metrics: list[dict], family: str) -> tuple[list[dict], list[str]]:
    """The records that log ``family`` (e.g. ``val_loss``), and its keys: the family, then per domain."""
    records = [m for m in metrics if family in m]
    domains = sorted({k for m in records for k in m if k.startswith(f"{family}/")})
    return records, ([family] if records else []) + domains


def _plot_curves(ax, records: list[dict], keys: list[str], label: str, ylabel: str) -> None:
    for key in keys:
        points = [(m["tokens"], m[key]) for m in records if key in m]
        main = "/" not in key
        ax.plot(*zip(*points), marker="o", markersize=3, linewidth=2 if main else 1, linestyle="-" if main else "--",
                label=_curve_label(key, label))
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")


def _curve_label(key: str, prefix: str) -> str:
    """``val_loss`` -> prefix; ``val_loss/code`` -> ``prefix (code)``."""
    _, _, domain = key.partition("/")
    return f"{prefix} ({domain})" if domain else prefix


def _model_evaluation(f: RunFolder) -> str:
    """A decoder's bits per byte; an encoder's or encoder-decoder's objective figures (and bits per byte
    beside them, should a run have both)."""
    result, bpb = f.read_objective_eval(), f.read_bpb()
    if result is None and _objective_of(f) == "clm":
        return _bits_per_byte(bpb)
    return (_objective(result) if result else not_run("eval/objective.json")) + (_bits_per_byte(bpb) if bpb else "")


def _objective_of(f: RunFolder) -> str:
    """The recipe's ``model.objective`` as written (clm where the recipe cannot be read: its own section
    says why)."""
    try:
        data = yaml.safe_load(f.recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "clm"
    model = data.get("model") if isinstance(data, dict) else None
    return str(model.get("objective", "clm")) if isinstance(model, dict) else "clm"


_OBJECTIVE_COLUMNS = {  # objective: (what it is, [(field, heading)])
    "mlm": ("masked language model", [
        ("masked_tokens", "masked tokens"), ("masked_accuracy", "masked-token accuracy"),
        ("mlm_loss", "MLM loss (nats/masked token)"), ("pll_bpb", "PLL bits per byte"),
        ("pll_windows", "PLL windows"), ("pll_tokens", "PLL tokens"), ("pll_bytes", "PLL bytes")]),
    "electra": ("ELECTRA generator and discriminator", [
        ("masked_tokens", "masked tokens"), ("masked_accuracy", "generator masked-token accuracy"),
        ("mlm_loss", "generator MLM loss (nats/masked token)"), ("rtd_accuracy", "replaced-token detection accuracy"),
        ("replaced_share", "replaced share"), ("rtd_recall", "replaced tokens detected")]),
    "span_corruption": ("span-corruption encoder-decoder", [
        ("target_tokens", "target tokens"), ("span_loss", "loss (nats/target token)"),
        ("span_accuracy", "target-token accuracy")]),
}
_PROBED = {"mlm": "the encoder", "electra": "the discriminator", "span_corruption": "the encoder"}


def _objective(result: ObjectiveResult) -> str:
    """The figures of a non-causal objective per domain and pooled, and the domain probe."""
    what, columns = _OBJECTIVE_COLUMNS[result.objective]
    st = result.settings
    headers = ["domain", "windows", *(heading for _, heading in columns)]

    def row(name: str, s) -> tuple:
        return (name, s.windows, *(getattr(s, field) for field, _ in columns))

    notes = {
        "mlm": " Pseudo-log-likelihood (Salazar et al. 2020): every text token masked in turn, its log-probability "
               f"summed, over the first {st.pll_windows_per_domain} windows of each domain only (a forward pass "
               "per token), in bits per UTF-8 byte of their text (lower is better).",
        "electra": " The generator fills the masked positions with its own samples; the discriminator marks each "
                   "position replaced or original. Always answering original scores 1 − the replaced share.",
        "span_corruption": " Noise spans replaced by sentinels (as in training), targets decoded with teacher "
                           "forcing; sentinels and EOS count as targets.",
    }[result.objective]
    text = (f"<p>The {escape(what)} ({escape(result.objective)}, checkpoint of step {st.step}) on up to "
            f"{st.max_windows_per_domain} fixed held-out windows of {st.window_len} tokens per domain, masked or "
            f"corrupted as in training's validation; figures pooled over the windows.{escape(notes)}</p>")
    text += table(headers, [row(d, s) for d, s in sorted(result.domains.items())],
                  total=row("overall (pooled)", result.overall))
    if st.domains_without_a_window:
        text += (f"<p>Not evaluated, shorter than one window of held-out tokens: "
                 f"{escape(', '.join(st.domains_without_a_window))}.</p>")
    p = result.probe
    if p is None:
        return text + "<p>Domain probe: not run (a single held-out domain).</p>"
    return text + (
        f"<p>Domain probe: a logistic regression on the mean-pooled final hidden states of {_PROBED[result.objective]} "
        f"tells the {p.domains} held-out domains apart with <b>{p.accuracy:.4f}</b> accuracy ({p.folds}-fold "
        f"stratified cross-validation over {p.windows} windows), against <b>{p.baseline:.4f}</b> for always "
        f"answering the largest domain.</p>")


def _bits_per_byte(bpb: BpbResult | None) -> str:
    if bpb is None:
        return not_run("eval/bpb.json")
    headers = ["domain", "bits per byte", "docs", "bytes", "tokens", "bytes per token"]

    def row(name: str, s) -> tuple:
        return (name, s.bpb, s.docs, s.bytes, s.tokens, s.bytes / max(s.tokens, 1))

    rows = [row(d, s) for d, s in sorted(bpb.domains.items(), key=lambda item: item[1].bpb)]
    return (
        "<p>Bits per UTF-8 byte of held-out documents, pooled within each domain (lower is better); "
        f"macro average over domains: <b>{bpb.macro_bpb:.4f}</b>.</p>"
        + table(headers, rows, total=row("overall (pooled)", bpb.overall))
    )


def _harness(result: dict | None) -> str:
    """Every task's metrics with the options it was run with (tasks may come from separate runs)."""
    if result is None:
        return ""

    def run_with(task: str) -> str:
        options = result.get("options", {})
        options = options.get(task, options)  # files written before options were kept per task hold one set
        shots = result.get("n-shot", {}).get(task)
        return ", ".join([str(options.get("backend", "tokenmill")), *([f"{shots}-shot"] if shots is not None else []),
                          *([f"first {options['limit']} items"] if options.get("limit") else [])])

    rows = [(task, metric, value, stderr, "higher" if hib else "lower" if hib is not None else "–", run_with(task))
            for task, metric, value, stderr, hib in harness_rows(result)]
    return ("<h3>lm-evaluation-harness</h3><p>Tasks run on the exported model.</p>"
            + table(["task", "metric", "value", "± stderr", "better", "run with"], rows))


def _membership(result: dict | None) -> str:
    if result is None:
        return ""
    rows = [(method, r["auc"], r["tpr_at_5fpr"]) for method, r in result["methods"].items()]
    return (f"<h3>Membership inference</h3><p>Can the model's scores tell texts it trained on from unseen ones? "
            f"{escape(membership_source(result))}. AUC 0.5 is chance; Min-K% Prob uses the {result['k']:.0%} least "
            f"likely of the first {result['max_tokens']} tokens of each text.</p>"
            + table(["method", "AUC", "TPR at 5% FPR"], rows))


_AUTO_CLASS = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM",
               "electra": "AutoModelForTokenClassification", "span_corruption": "AutoModelForSeq2SeqLM"}


def _model(model_dir: Path, objective: str) -> str:
    if not model_dir.is_dir():
        return not_run("model/ (the Hugging Face export)")
    path = escape(str(model_dir.resolve()))
    auto = _AUTO_CLASS.get(objective, "AutoModel")
    return (f"<p>Hugging Face export in <code>{path}</code>; load it with "
            f"<code>transformers.{auto}.from_pretrained(&quot;{path}&quot;)</code>.</p>")
