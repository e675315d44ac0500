"""The run report: one HTML file, readable offline, that shows what every stage of a run did.

Everything is inline (CSS, plots as base64 PNG) so the file can be mailed or archived alone. Each
section reads the files its stage leaves in the run folder and says "not run" when they are absent, so
the report also serves a run that stopped half-way. Text from the data is always HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
from html import escape
from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tokenmill import TokenmillError

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem;
       color: #1d232a; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #d7dde4; padding-bottom: .2rem; margin-top: 2.4rem; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { padding: .25rem .7rem; border-bottom: 1px solid #e3e7ec; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f4f7; }
tr.total td { font-weight: 600; border-top: 2px solid #aab4bf; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.not-run { color: #8a6d00; font-style: italic; }
img { max-width: 100%; }
.warning { background: #fff4d6; border-left: 4px solid #d99a00; padding: .5rem .8rem; }
td.best { font-weight: 700; }
td.not-comparable { color: #8a8f96; text-decoration: line-through; }
"""


def write_report(run_dir: Path) -> Path:
    """Build ``run_dir/report.html`` from whatever stages have run; returns its path."""
    run_dir = Path(run_dir)
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise TokenmillError(f"{recipe} not found: a report needs a run folder made by `tokenmill run`")
    timings = read_json(run_dir / "timings.json")
    bodies = {
        "recipe": _recipe(recipe),
        "timings": _timings(timings),
        "curation": _curation(run_dir / "curate"),
        "tokens": _tokens(read_json(run_dir / "tokens" / "train" / "meta.json")),
        "training": _training(read_jsonl(run_dir / "train" / "metrics.jsonl"), timings),
        "evaluation": _evaluation(run_dir / "eval"),
        "model": _model(run_dir / "model"),
    }
    return write_page(run_dir / "report.html", f"tokenmill run {run_dir.resolve().name}", bodies)


def write_page(out: Path, title: str, sections: dict[str, str]) -> Path:
    """Write a report page atomically: ``sections`` maps a section name to its HTML body, in order,
    each linked from the navigation bar at the top."""
    nav = " ".join(f'<a href="#{name}">{escape(name.capitalize())}</a>' for name in sections)
    body = "\n".join(f'<section id="{name}"><h2>{escape(name.capitalize())}</h2>\n{html}</section>'
                     for name, html in sections.items())
    title = escape(title)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>{title}</h1>\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---- reading ------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenmillError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); rerun the stage that wrote it")


def read_jsonl(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TokenmillError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete the line")
    return records


# ---- html pieces ----------------------------------------------------------------------------------


def not_run(what: str) -> str:
    return f'<p class="not-run">Not run: {escape(what)} not found.</p>'


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], total: Iterable[Any] | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    lines = ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows]
    if total is not None:
        lines.append('<tr class="total">' + "".join(f"<td>{cell(v)}</td>" for v in total) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):  # four decimals where they matter (bits per byte, losses), none on big numbers
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return escape(str(value))


def png(fig: Figure) -> str:
    """The figure as an inline <img>, rendered by the Agg canvas without touching pyplot's global state."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


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


def _curation(curate_dir: Path) -> str:
    read = read_json(curate_dir / "read" / "stats.json")
    steps = [
        read_json(folder / "stats.json")
        for folder in sorted(p for p in curate_dir.glob("*") if p.is_dir() and p.name != "read")
        if (folder / "stats.json").is_file()
    ]
    stages = ([read] if read else []) + steps
    if not stages:
        return not_run("curate/*/stats.json")
    first = stages[0]
    funnel = table(
        ["stage", "docs in", "docs removed", "docs kept", "kept of input", "bytes kept", "bytes kept of input",
         "seconds"],
        [
            (s["step"], s["input_docs"], s["removed_docs"], s["kept_docs"],
             _percent(s["kept_docs"], first["input_docs"]), s["kept_bytes"],
             _percent(s["kept_bytes"], first["input_bytes"]), float(s["seconds"]))
            for s in stages
        ],
    )
    reasons = [
        (s["step"], reason, count, _percent(count, s["input_docs"]))
        for s in stages
        for reason, count in sorted(s["removed"].items(), key=lambda item: (-item[1], item[0]))
    ]
    counters = [(s["step"], name, value) for s in stages for name, value in sorted(s.get("counters", {}).items())]
    return (
        "<h3>Funnel</h3>" + funnel + _funnel_plot(stages)
        + "<h3>Removed, by reason</h3>"
        + (table(["stage", "reason", "documents", "of stage input"], reasons) if reasons else "<p>Nothing removed.</p>")
        + (("<h3>Other events</h3>" + table(["stage", "counter", "count"], counters)) if counters else "")
    )


def _funnel_plot(stages: list[dict]) -> str:
    names = ["input"] + [s["step"] for s in stages]
    docs = [stages[0]["input_docs"]] + [s["kept_docs"] for s in stages]
    megabytes = [stages[0]["input_bytes"] / 1e6] + [s["kept_bytes"] / 1e6 for s in stages]
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


def _training(metrics: list[dict] | None, timings: dict | None) -> str:
    """Loss curves (and held-out bits per byte, when the trainer measured it) against tokens seen;
    throughput and MFU are medians of the logged ``tokens_per_s`` and ``mfu`` (robust to the compile
    warm-up), throughput failing that tokens over the train stage's time."""
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


def _evaluation(eval_dir: Path) -> str:
    return (_bits_per_byte(read_json(eval_dir / "bpb.json")) + _harness(read_json(eval_dir / "harness.json"))
            + _membership(read_json(eval_dir / "membership.json")))


def _bits_per_byte(bpb: dict | None) -> str:
    if bpb is None:
        return not_run("eval/bpb.json")
    headers = ["domain", "bits per byte", "docs", "bytes", "tokens", "bytes per token"]

    def row(name: str, s: dict) -> tuple:
        return (name, float(s["bpb"]), s["docs"], s["bytes"], s["tokens"], s["bytes"] / max(s["tokens"], 1))

    rows = [row(d, s) for d, s in sorted(bpb["domains"].items(), key=lambda item: item[1]["bpb"])]
    return (
        "<p>Bits per UTF-8 byte of held-out documents, pooled within each domain (lower is better); "
        f"macro average over domains: <b>{float(bpb['macro_bpb']):.4f}</b>.</p>"
        + table(headers, rows, total=row("overall (pooled)", bpb["overall"]))
    )


def harness_rows(result: dict) -> list[tuple[str, str, float, float | None, bool | None]]:
    """``(task, metric, value, stderr, higher_is_better)`` of each metric in a ``harness.json``; a metric
    under a filter other than lm_eval's ``none`` is named ``metric,filter``."""
    rows = []
    for task, metrics in result["results"].items():
        better = result.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, metric if filter_name == "none" else key, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None, better.get(metric)))
    return rows


def _harness(result: dict | None) -> str:
    if result is None:
        return ""
    options = result.get("options", {})
    limit = f", first {options['limit']} items per task" if options.get("limit") else ""
    rows = [(task, metric, value, stderr, "higher" if hib else "lower" if hib is not None else "–")
            for task, metric, value, stderr, hib in harness_rows(result)]
    return (f"<h3>lm-evaluation-harness</h3><p>Tasks run on the exported model (backend "
            f"{escape(str(options.get('backend', 'tokenmill')))}{escape(limit)}).</p>"
            + table(["task", "metric", "value", "± stderr", "better"], rows))


def membership_source(result: dict) -> str:
    """Which texts a ``membership.json`` compared, in a sentence."""
    auto = result["source"].get("auto")
    if not auto:
        return (f"{result['members']} texts from {result['source']['members']} against "
                f"{result['nonmembers']} from {result['source']['nonmembers']}")
    epochs = auto.get("epochs_seen")
    return (f"{result['members']} curated training documents against as many held-out ones, matched per domain "
            f"({', '.join(f'{d}: {k}' for d, k in auto['per_domain'].items())})"
            + (f"; the model saw {epochs:.2f} epochs of its training tokens" if epochs else ""))


def _membership(result: dict | None) -> str:
    if result is None:
        return ""
    rows = [(method, r["auc"], r["tpr_at_5fpr"]) for method, r in result["methods"].items()]
    return (f"<h3>Membership inference</h3><p>Can the model's scores tell texts it trained on from unseen ones? "
            f"{escape(membership_source(result))}. AUC 0.5 is chance; Min-K% Prob uses the {result['k']:.0%} least "
            f"likely of the first {result['max_tokens']} tokens of each text.</p>"
            + table(["method", "AUC", "TPR at 5% FPR"], rows))


def _model(model_dir: Path) -> str:
    if not model_dir.is_dir():
        return not_run("model/ (the Hugging Face export)")
    path = escape(str(model_dir.resolve()))
    return (f"<p>Hugging Face export in <code>{path}</code>; load it with "
            f"<code>transformers.AutoModelForCausalLM.from_pretrained(&quot;{path}&quot;)</code>.</p>")
