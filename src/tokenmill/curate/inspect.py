"""``tokenmill inspect``: what each curation step kept and removed, with samples per reason.

Users trust a filter only after reading what it threw away; this prints the funnel of every step and,
for one step, a few kept documents and a few removed ones for each reason.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill import TokenmillError
from tokenmill.console import text_table
from tokenmill.documents.shards import list_shards
from tokenmill.runfolder import RunFolder, StepFolder

CLUSTER_COLUMN = "cluster"  # written by the ``cluster`` step (its default column)
_CLUSTER_CHARS = 100  # per sample document: clusters are many, one line each keeps them on a screen


def step_folders(run_dir: Path) -> list[StepFolder]:
    """The read stage and every completed step of a run, in order."""
    steps = RunFolder(run_dir).require().steps()
    if not steps:
        raise TokenmillError(f"{run_dir}: no curation step has finished yet; run `tokenmill run` first")
    return steps


def funnel_table(run_dir: Path) -> str:
    """One row per step; the read stage's held-out documents have their own column, so that every row
    reads in = kept + removed + held out."""
    rows = []
    for d in step_folders(run_dir):
        s = d.read_stats()
        reasons = sorted(s.removed.items(), key=lambda kv: -kv[1])[:3]
        rows.append((d.name, s.input_docs, s.kept_docs, s.removed_docs, s.counters.get("heldout_docs"),
                     round(s.kept_bytes / 1e6, 2), ", ".join(f"{k} {v}" for k, v in reasons) or "-"))
    return text_table(["step", "in docs", "kept", "removed", "held out", "kept MB", "top reasons"], rows)


def _find_step(run_dir: Path, name: str) -> StepFolder:
    """A step by folder name, step name or number (``3``: curate/03-*; ``0``: the read stage)."""
    steps = step_folders(run_dir)
    for d in steps:
        if name in (d.name, d.name.split("-", 1)[-1]) or (name.isdigit() and int(name) == _number(d)):
            return d
    raise TokenmillError(f"no completed step {name!r} in {run_dir}; steps: "
                         f"{', '.join(f'{_number(d)} {d.name}' for d in steps)}")


def _number(step: StepFolder) -> int:
    """``NN`` of curate/NN-STEP; 0 for the read stage."""
    prefix = step.name.split("-", 1)[0]
    return int(prefix) if prefix.isdigit() else 0


def _snippet(text: str, chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars] + " …"


def _samples(table: pa.Table, n: int, rng: random.Random) -> list[dict]:
    idx = sorted(rng.sample(range(table.num_rows), min(n, table.num_rows)))
    return table.take(pa.array(idx, pa.int64())).to_pylist()  # typed: an empty sample is no null array


def inspect_step(run_dir: Path, name: str, samples: int = 3, reason: str | None = None, chars: int = 300,
                 seed: int = 0) -> str:
    d = _find_step(run_dir, name)
    rng = random.Random(seed)
    stats = d.read_stats()
    heldout = stats.counters.get("heldout_docs")
    out = [f"== {d.name}: {stats.input_docs} in, {stats.kept_docs} kept, {stats.removed_docs} removed"
           + (f", {heldout} held out" if heldout is not None else "")]
    if stats.counters:
        out.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.counters.items())))
    kept_shards = list_shards(d.documents)
    if reason is None and kept_shards:
        kept = pq.read_table(kept_shards[rng.randrange(len(kept_shards))])
        out.append(f"\n-- kept (sample of {min(samples, kept.num_rows)})")
        out += [f"[{r['id']}] {_snippet(r['text'], chars)}" for r in _samples(kept, samples, rng)]
        if CLUSTER_COLUMN in kept.column_names:
            # its own generator: the removed samples below stay those shown without a cluster column
            out += _cluster_samples(kept_shards, samples, min(chars, _CLUSTER_CHARS), random.Random(seed))
    rejected_shards = list_shards(d.rejected)
    if not rejected_shards:
        note = "no removals" if not stats.removed_docs else "removed documents were not kept (keep_rejected: false)"
        out.append(f"\n-- removed: {note}")
        return "\n".join(out)
    removed = pa.concat_tables(pq.read_table(p) for p in rejected_shards)
    reasons = [reason] if reason else sorted(stats.removed, key=lambda k: -stats.removed[k])
    for r in reasons:
        part = removed.filter(pc.equal(removed.column("reason"), r))
        out.append(f"\n-- removed: {r} ({stats.removed.get(r, 0)} documents)")
        out += [f"[{row['id']}]{_duplicate_note(row)} {_snippet(row['text'], chars)}"
                for row in _samples(part, samples, rng)]
    return "\n".join(out)


def _cluster_samples(shards: list[Path], samples: int, chars: int, rng: random.Random) -> list[str]:
    """Every cluster's size and a few of its documents: a cluster earns a name in a mixture only once its
    members read alike. Sizes count every kept shard (one column read); samples come from shards in random
    order until each cluster has enough, so a large run is not read whole."""
    sizes = pc.value_counts(pa.chunked_array(
        [pq.read_table(p, columns=[CLUSTER_COLUMN]).column(0) for p in shards])).to_pylist()
    sizes = {s["values"]: s["counts"] for s in sorted(sizes, key=lambda s: str(s["values"]))}
    picked: dict[str, list[dict]] = {name: [] for name in sizes}
    for path in rng.sample(shards, len(shards)):
        if all(len(rows) >= min(samples, sizes[name]) for name, rows in picked.items()):
            break
        table = pq.read_table(path, columns=["id", "text", CLUSTER_COLUMN])
        for name, rows in picked.items():
            part = table.filter(pc.equal(table.column(CLUSTER_COLUMN), name))
            rows += _samples(part, samples - len(rows), rng)
    out = [f"\n-- {len(sizes)} clusters ({CLUSTER_COLUMN} column)"]
    for name, rows in picked.items():
        out.append(f"{name} ({sizes[name]} documents)")
        out += [f"  [{r['id']}] {_snippet(r['text'], chars)}" for r in rows]
    return out


def _duplicate_note(row: dict) -> str:
    """What a deduplicated document was a duplicate of, and how near it was (a chained cluster member can
    be far from the document it is credited to)."""
    if not row.get("duplicate_of"):
        return ""
    similarity = row.get("similarity")
    return f" (duplicate of {row['duplicate_of']}" + (f", similarity {similarity:.2f})" if similarity is not None
                                                      else ")")
