"""The comparison page of ``tokenmill compare``: one self-contained HTML file beside ``compare.json``.

It draws only from the comparison dict (``tokenmill.evaluate.compare.compare_runs``), so it can be rebuilt from
``compare.json`` alone, and shares the run report's styling, tables and inline plots.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from matplotlib.figure import Figure

from tokenmill.files import write_json_atomic
from tokenmill.report.page import cell, png, table, write_page
from tokenmill.runfolder import OBJECTIVE_FIGURES

_VIEWS = ("final", "equal_tokens", "equal_compute")
_BPB = ("val_bpb", "bpb", "eval_bpb")  # bits-per-byte families, drawn together per domain
_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#bab0ac")


def write_compare(result: dict, out_dir: Path) -> Path:
    """Write ``out_dir/compare.json`` and ``out_dir/compare.html``; return the HTML's path."""
    out_dir = Path(out_dir)
    write_json_atomic(result, out_dir / "compare.json")
    sections = {"runs": _runs(result), "results": _results(result), "plots": _plots(result)}
    if "fit" in result:
        sections["fit"] = _fit(result["fit"])
    names = ", ".join(r["name"] for r in result["runs"])
    return write_page(out_dir / "compare.html", f"tokenmill compare: {names}", sections)


def _flops(value: float) -> str:
    return f"{value:.3g}"


def _runs(result: dict) -> str:
    objectives = [r.get("objective", "clm") for r in result["runs"]]
    encoders = any(o != "clm" for o in objectives)  # the objective column only where it says something
    rows = [(r["name"], *([o] if encoders else []), r["params"], int(r["tokens"]), _flops(r["flops_per_token"]),
             _flops(r["train_flops"]), _flops(r["select_flops"]) if r["select_flops"] else "–", r["select_seconds"],
             _flops(r["mix_search_flops"]) if r["mix_search_flops"] else "–", _flops(r["flops"]),
             r["tokenizer"] or "unknown") for r, o in zip(result["runs"], objectives)]
    warnings = "".join(f'<p class="warning">{escape(w)}</p>' for w in result["warnings"])
    return warnings + table(
        ["run", *(["objective"] if encoders else []), "parameters N", "tokens seen", "FLOPs per token",
         "training FLOPs", "selection FLOPs", "selection seconds", "mixture-search FLOPs", "total FLOPs",
         "tokenizer"], rows) + (
        "<p>Training FLOPs are 6·N·D plus attention (the model's own count per token); selection FLOPs come "
        "from a run's <code>select_cost.json</code>.</p>")


def _results(result: dict) -> str:
    """One table: each metric at every run's end, at equal tokens and at equal compute; the best value
    of each equal view in bold, loss-per-token rows struck through when tokenizers differ."""
    names = [r["name"] for r in result["runs"]]
    headings = {"final": "at each run's end",
                "equal_tokens": f"at equal tokens ({result['equal_tokens']['tokens']:,.0f})",
                "equal_compute": f"at equal compute ({_flops(result['equal_compute']['flops'])} FLOPs)"}
    span = len(names)
    head = ('<tr><th rowspan="2">metric</th><th rowspan="2">unit</th>'
            + "".join(f'<th colspan="{span}">{escape(headings[v])}</th>' for v in _VIEWS) + "</tr><tr>"
            + "".join(f"<th>{escape(n)}</th>" for _ in _VIEWS for n in names) + "</tr>")
    body = []
    for metric, info in result["metrics"].items():
        cells = [f"<td>{escape(metric)}</td>", f"<td>{escape(info['unit'])}</td>"]
        for view in _VIEWS:
            values = result[view]["values"][metric]
            best = _best(values, info) if view != "final" and info["comparable"] else None
            for name in names:
                css = "not-comparable" if not info["comparable"] else "best" if name == best else ""
                cells.append(f'<td class="{css}">' if css else "<td>")
                cells.append(f"{cell(values[name])}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    objective = [m for m in result["metrics"] if m.split("/")[0] in OBJECTIVE_FIGURES]
    objective_note = (
        " Rows of the non-causal objectives, after training (eval/objective.json): "
        + "; ".join(f"{f}: {info.label}" for f, info in OBJECTIVE_FIGURES.items()
                    if any(m.split("/")[0] == f for m in objective))
        + ". Their val_loss is the objective's own loss (masked tokens, ELECTRA's combined loss, span targets)."
    ) if objective else ""
    return (
        "<p>val_loss: validation loss in nats per token, logged during training; val_bpb: the same in bits per "
        "byte (through each held-out domain's tokens per byte); bpb: bits per byte of held-out documents during "
        "training; eval_bpb: the same after training; other rows: lm-evaluation-harness metrics. Equal-tokens "
        "and equal-compute values are interpolated in log tokens between logged points; – where a run has no "
        f"value there.{escape(objective_note)}</p>"
        f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
    )


def _best(values: dict[str, float | None], info: dict) -> str | None:
    present = {n: v for n, v in values.items() if v is not None}
    if len(present) < 2:
        return None
    pick = max if info["higher_is_better"] else min
    return pick(present, key=present.get)


def _plots(result: dict) -> str:
    families = {m: m.split("/")[0] for m in result["metrics"]}
    losses = [m for m, f in families.items() if f == "val_loss"]
    bpb = [m for m, f in families.items() if f in _BPB]
    domains = sorted({m.partition("/")[2] for m in bpb})  # "" (all domains) first
    objective = [m for m, f in families.items() if f in OBJECTIVE_FIGURES]
    harness = [m for m, f in families.items() if f != "val_loss" and f not in _BPB and f not in OBJECTIVE_FIGURES]
    parts = []
    if losses:
        parts.append("<h3>Validation loss</h3>" + _figure(result, [(m, [m]) for m in losses]))
    if domains:
        rows = [(f"bits per byte, {d}" if d else "bits per byte, all domains (val_bpb: mean, others: pooled)",
                 [f"{f}/{d}" if d else f for f in _BPB]) for d in domains]
        parts.append("<h3>Bits per byte</h3><p>Dotted: val_bpb, from the validation loss; solid: bpb, measured "
                     "during training; diamonds: eval_bpb, after training.</p>" + _figure(result, rows))
    if objective:
        parts.append("<h3>Objective evaluation</h3><p>Each encoder's figures after training "
                     "(eval/objective.json).</p>" + _figure(result, [(m, [m]) for m in objective]))
    if harness:
        parts.append("<h3>Harness</h3>" + _figure(result, [(m, [m]) for m in harness]))
    return "".join(parts) or "<p>No evaluation to plot.</p>"


def _figure(result: dict, rows: list[tuple[str, list[str]]]) -> str:
    """One row of plots per ``(title, metrics)``, against tokens seen (left) and training FLOPs (right);
    dashed lines mark the equal-tokens and equal-compute points."""
    runs = result["runs"]
    fig = Figure(figsize=(11, 2.8 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (by_tokens, by_flops), (title, metrics) in zip(axes, rows):
        for run, color in zip(runs, _COLORS * (len(runs) // len(_COLORS) + 1)):
            for metric in metrics:
                points = result["series"][run["name"]].get(metric, [])
                tokens, values = [t for t, _ in points], [v for _, v in points]
                flops = [run["select_flops"] + run["mix_search_flops"] + run["flops_per_token"] * t for t in tokens]
                style = dict(color=color, marker="D", markersize=7, linestyle="none") if len(points) == 1 else \
                    dict(color=color, marker="o", markersize=3, linestyle=":" if metric.startswith("val_bpb") else "-")
                by_tokens.plot(tokens, values, label=run["name"] if metric == metrics[0] else None, **style)
                by_flops.plot(flops, values, **style)
        info = next(result["metrics"][m] for m in metrics if m in result["metrics"])
        if not info["comparable"]:
            reasons = [*(["tokenizers differ"] if not result["same_tokenizer"] else []),
                       *(["objectives differ"] if len({r.get("objective", "clm") for r in runs}) > 1 else [])]
            title += f"  (not comparable: {', '.join(reasons) or 'tokenizers differ'})"
        for ax, x, label in ((by_tokens, result["equal_tokens"]["tokens"], "tokens seen"),
                             (by_flops, result["equal_compute"]["flops"], "training FLOPs (with selection)")):
            ax.axvline(x, color="#888888", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(info["unit"])
            ax.set_title(title, fontsize="medium")
    axes[0][0].legend(fontsize="small")
    return png(fig)


def _fit(fit: dict) -> str:
    level = f"{fit['confidence']:.0%}"
    rows = [(name, value, *(fit["intervals"].get(name) or (None, None))) for name, value in fit["params"].items()]
    points = [(p["run"], p["N"], int(p["D"]), p["observed"], p["predicted"]) for p in fit["points"]]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for (n, curve), color in zip(fit["curves"].items(), _COLORS):
        ax.plot(*zip(*curve), color=color, label=f"fit, N = {int(n):,}" if len(fit["curves"]) > 1 else "fit")
        observed = [(p["D"], p["observed"]) for p in fit["points"] if str(p["N"]) == n]
        ax.plot(*zip(*observed), color=color, marker="o", linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel(fit["target"])
    ax.legend(fontsize="small")
    return (
        f"<p><code>{escape(fit['formula'])}</code> fitted to each run's last {escape(fit['target'])} (Huber loss "
        f"in log space, {fit['n_bootstrap']} bootstrap resamples of the runs for the {level} intervals).</p>"
        + table(["constant", "value", f"{level} low", f"{level} high"], rows)
        + table(["run", "N", "D", "observed", "predicted"], points) + png(fig)
    )
