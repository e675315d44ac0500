"""The read stage: sources → Parquet shards in the core schema, a held-out split, and rejects.

The held-out documents are chosen by a hash of the document id (so the choice does not depend on
file order or on the other documents) before any curation runs: curation, tokenizer training and
training never see them, and per-domain evaluation on them is honest.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from tokenmill import TokenmillError
from tokenmill.documents.readers import ReadStats, Record, SourceConfig, read_source
from tokenmill.documents.schema import make_table, with_reason
from tokenmill.documents.shards import ShardBuffer, shard_name, text_bytes, write_json_atomic, write_parquet_atomic


class HeldoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of each domain's documents held out "
                                                              "for evaluation (chosen by a hash of the id).")
    max_docs_per_domain: int | None = Field(50, ge=1, description="Cap on held-out documents per domain.")
    min_docs_per_domain: int = Field(1, ge=0, description="Hold out at least this many documents of every "
                                                          "domain with enough documents (at least 2× this).")


def _hash_unit(doc_id: str) -> float:
    """A stable number in [0, 1) from a document id."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def choose_heldout(records: Sequence[tuple[str, str]], cfg: HeldoutConfig) -> set[str]:
    """Ids to hold out: per domain, the lowest-hash ids — ``fraction`` of them, within the bounds."""
    by_domain: dict[str, list[tuple[float, str]]] = {}
    for doc_id, domain in records:
        by_domain.setdefault(domain, []).append((_hash_unit(doc_id), doc_id))
    chosen: set[str] = set()
    for items in by_domain.values():
        items.sort()
        n = round(cfg.fraction * len(items))
        if len(items) >= 2 * cfg.min_docs_per_domain:
            n = max(n, cfg.min_docs_per_domain)
        if cfg.max_docs_per_domain is not None:
            n = min(n, cfg.max_docs_per_domain)
        chosen.update(doc_id for _, doc_id in items[:n])
    return chosen if cfg.fraction > 0 else set()


def _row(rec: Record) -> dict:
    return {"id": rec.id, "text": rec.text, "domain": rec.domain, "source": rec.source, "meta": rec.meta}


def ingest(sources: Sequence[SourceConfig], out_dir: Path, heldout_path: Path, heldout: HeldoutConfig,
           *, base_dir: Path | None = None, shard_docs: int = 2000, shard_bytes: int = 64 << 20,
           keep_rejected: bool = True, progress: bool = True) -> dict:
    """Read every source into ``out_dir/shard-*.parquet`` (+ ``rejected/``) and the held-out Parquet file.

    Two passes over the sources: the first only collects (id, domain) to choose the held-out set and
    to find duplicate ids, the second writes; so memory holds ids, never the corpus. The stage writes
    into a temporary folder renamed into place at the end: it is either complete or absent.
    """
    t0 = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    keys: list[tuple[str, str]] = []
    for src in sources:
        scan = ReadStats()
        keys.extend((r.id, r.domain) for r in read_source(src, scan, base_dir) if not r.reason)
    held = choose_heldout(keys, heldout)
    del keys

    stats = ReadStats()
    seen: set[str] = set()
    heldout_rows: list[dict] = []
    counts = {"input_docs": 0, "kept_docs": 0, "heldout_docs": 0}
    n_shards = [0, 0]

    def flush_kept(rows: list[dict]) -> None:
        table = make_table(rows)
        counts["kept_bytes"] = counts.get("kept_bytes", 0) + text_bytes(table)
        write_parquet_atomic(table, tmp / shard_name(n_shards[0]))
        n_shards[0] += 1

    def flush_rejected(rows: list[dict]) -> None:
        if keep_rejected:
            reasons = [r.pop("reason") for r in rows]
            write_parquet_atomic(with_reason(make_table(rows), reasons, "read"),
                                 tmp / "rejected" / shard_name(n_shards[1]))
            n_shards[1] += 1

    kept = ShardBuffer(flush_kept, shard_docs, shard_bytes)
    rejected = ShardBuffer(flush_rejected, shard_docs, shard_bytes)
    bar = tqdm(desc="read", unit="doc", disable=not progress)
    for src in sources:
        for rec in read_source(src, stats, base_dir):
            bar.update()
            counts["input_docs"] += 1
            if not rec.reason and rec.id in seen:
                rec.reason = "duplicate_id"
                stats.reject("duplicate_id")
            if rec.reason:
                rejected.add(_row(rec) | {"reason": rec.reason})
                continue
            seen.add(rec.id)
            if rec.id in held:
                heldout_rows.append(_row(rec))
            else:
                counts["kept_docs"] += 1
                kept.add(_row(rec))
    bar.close()
    kept.close()
    rejected.close()
    if counts["kept_docs"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_empty(sources, stats)
    heldout_table = make_table(heldout_rows)
    write_parquet_atomic(heldout_table, heldout_path)
    summary = {
        "step": "read", "files": stats.files, "input_docs": counts["input_docs"],
        "input_bytes": counts.get("kept_bytes", 0) + text_bytes(heldout_table),
        "kept_docs": counts["kept_docs"], "kept_bytes": counts.get("kept_bytes", 0),
        "removed_docs": sum(stats.rejected.values()), "removed": dict(stats.rejected),
        "counters": {"heldout_docs": heldout_table.num_rows}, "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(summary, tmp / "stats.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return summary


def raise_empty(sources: Sequence[SourceConfig], stats: ReadStats) -> None:
    paths = ", ".join(s.path for s in sources)
    raise TokenmillError(f"no readable document in {paths} ({stats.records} records, rejected: "
                         f"{stats.rejected or 'none'}); check `text_field` and the file format")
