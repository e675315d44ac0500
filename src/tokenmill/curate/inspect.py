"""``tokenmill inspect``: what each curation step kept and removed, with samples per reason.

Users trust a filter only after reading what it threw away; this prints the funnel of every step and,
for one step, a few kept documents and a few removed ones for each reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill import TokenmillError
from tokenmill.documents.shards import list_shards


def step_dirs(run_dir: Path) -> list[Path]:
    """The read stage and every step folder of a run, in order."""
    curate = Path(run_dir) / "curate"
    if not curate.is_dir():
        raise TokenmillError(f"{run_dir} has no curate/ folder: is it a tokenmill run folder?")
    dirs = [curate / "read"] + sorted(p for p in curate.iterdir() if p.is_dir() and p.name[:2].isdigit())
    return [d for d in dirs if (d / "stats.json").exists()]


def funnel_table(run_dir: Path) -> str:
    rows = [("step", "in docs", "kept", "removed", "kept MB", "top reasons")]
    for d in step_dirs(run_dir):
        s = json.loads((d / "stats.json").read_text())
        reasons = sorted(s["removed"].items(), key=lambda kv: -kv[1])[:3]
        rows.append((d.name, str(s["input_docs"]), str(s["kept_docs"]), str(s["removed_docs"]),
                     f"{s['kept_bytes'] / 1e6:.2f}", ", ".join(f"{k} {v}" for k, v in reasons) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _find_step(run_dir: Path, name: str) -> Path:
    dirs = step_dirs(run_dir)
    for d in dirs:
        if name in (d.name, d.name.split("-", 1)[-1]):
            return d
    raise TokenmillError(f"no completed step {name!r} in {run_dir}; steps: {', '.join(d.name for d in dirs)}")


def _snippet(text: str, chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars] + " …"


def _samples(table: pa.Table, n: int, rng: random.Random) -> list[dict]:
    idx = sorted(rng.sample(range(table.num_rows), min(n, table.num_rows)))
    return table.take(idx).to_pylist()


def inspect_step(run_dir: Path, name: str, samples: int = 3, reason: str | None = None, chars: int = 300,
                 seed: int = 0) -> str:
    d = _find_step(run_dir, name)
    rng = random.Random(seed)
    stats = json.loads((d / "stats.json").read_text())
    out = [f"== {d.name}: {stats['input_docs']} in, {stats['kept_docs']} kept, {stats['removed_docs']} removed"]
    if stats.get("counters"):
        out.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["counters"].items())))
    kept_shards = list_shards(d)
    if reason is None and kept_shards:
        kept = pq.read_table(kept_shards[rng.randrange(len(kept_shards))])
        out.append(f"\n-- kept (sample of {min(samples, kept.num_rows)})")
        out += [f"[{r['id']}] {_snippet(r['text'], chars)}" for r in _samples(kept, samples, rng)]
    rejected_shards = list_shards(d / "rejected")
    if not rejected_shards:
        note = "no removals" if not stats["removed_docs"] else "removed documents were not kept (keep_rejected: false)"
        out.append(f"\n-- removed: {note}")
        return "\n".join(out)
    removed = pa.concat_tables(pq.read_table(p) for p in rejected_shards)
    reasons = [reason] if reason else sorted(stats["removed"], key=lambda k: -stats["removed"][k])
    for r in reasons:
        part = removed.filter(pc.equal(removed.column("reason"), r))
        out.append(f"\n-- removed: {r} ({stats['removed'].get(r, 0)} documents)")
        out += [f"[{row['id']}] {_snippet(row['text'], chars)}" for row in _samples(part, samples, rng)]
    return "\n".join(out)
