"""Plain-text tables for the terminal, the one renderer every command's console output uses."""

from __future__ import annotations


def text_table(headers: list[str], rows: list[tuple]) -> str:
    """Columns of numbers right-aligned, the first column and text left-aligned, a rule under the
    header; None shows as –."""
    shown = [list(map(str, headers))] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in shown) for i in range(len(headers))]
    numeric = [i > 0 and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(r, widths, numeric)).rstrip()
             for r in shown]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)
