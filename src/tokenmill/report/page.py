"""Building blocks of tokenmill's HTML pages (the run report and the comparison): one inline style
sheet, escaped tables, figures as inline PNG, and an atomic write of the page.

Everything is inline so a page can be mailed or archived alone; text from the data is always escaped.
"""

from __future__ import annotations

import base64
import io
import os
from html import escape
from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CSS = """
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


def write_page(out: Path, title: str, sections: dict[str, str]) -> Path:
    """Write a report page atomically: ``sections`` maps a section name to its HTML body, in order,
    each linked from the navigation bar at the top."""
    nav = " ".join(f'<a href="#{name}">{escape(name.capitalize())}</a>' for name in sections)
    body = "\n".join(f'<section id="{name}"><h2>{escape(name.capitalize())}</h2>\n{html}</section>'
                     for name, html in sections.items())
    title = escape(title)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head>\n<body><h1>{title}</h1>\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


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
