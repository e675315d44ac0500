"""The read stage: sources → Parquet shards in the core schema, a held-out split, and rejects.

The held-out documents are chosen by a hash of the document id (so the choice does not depend on
file order or on the other documents) before any curation runs: curation, tokenizer training and
training never see them, and per-domain evaluation on them is honest.

Memory is bounded by a shard, not by the corpus: the stage reads its sources twice, and between the
passes it holds only a 64-bit hash and a domain number per document (12 bytes; 120 MB for ten million
documents), never ids or texts. Two different ids share a hash with probability about n²/2⁶⁵ (3·10⁻⁶
at ten million documents); the later one would be rejected as ``duplicate_id``, counted, not lost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from array import array
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from tokenmill import TokenmillError
from tokenmill.documents.readers import ReadStats, Record, SourceConfig, read_source
from tokenmill.documents.schema import SCHEMA, make_table, with_reason
from tokenmill.documents.shards import ShardBuffer, shard_name, text_bytes, write_parquet_atomic
from tokenmill.runfolder import StepFolder, StepStats


class HeldoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of each domain's documents held out "
                                                              "for evaluation (chosen by a hash of the id).")
    max_docs_per_domain: int | None = Field(50, ge=1, description="Cap on held-out documents per domain.")
    min_docs_per_domain: int = Field(1, ge=0, description="Hold out at least this many documents of every "
                                                          "domain with enough documents (at least 2× this).")


def id_hash(doc_id: str) -> bytes:
    """8 bytes of BLAKE2b: a document id's hash, stable across processes (read as little-endian uint64)."""
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """True where a hash appears for the first time (later equal hashes are duplicate ids)."""
    first = np.zeros(len(hashes), bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    return first


def heldout_mask(hashes: np.ndarray, domains: np.ndarray, cfg: HeldoutConfig) -> np.ndarray:
    """Which documents to hold out: per domain, the ``fraction`` of its distinct ids with the lowest
    hashes, within the per-domain bounds. Hashes must be distinct (see ``first_occurrences``)."""
    held = np.zeros(len(hashes), bool)
    if cfg.fraction == 0 or len(hashes) == 0:
        return held
    order = np.lexsort((hashes, domains))  # by domain, then by hash
    sorted_domains = domains[order]
    starts = np.flatnonzero(np.r_[True, sorted_domains[1:] != sorted_domains[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    take = np.round(cfg.fraction * sizes).astype(np.int64)
    take = np.where(sizes >= 2 * cfg.min_docs_per_domain, np.maximum(take, cfg.min_docs_per_domain), take)
    if cfg.max_docs_per_domain is not None:
        take = np.minimum(take, cfg.max_docs_per_domain)
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    held[order] = rank < np.repeat(take, sizes)
    return held


def read_decisions(hashes: np.ndarray, domains: np.ndarray, cfg: HeldoutConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per record, in reading order: does its id repeat an earlier one, and is it held out."""
    first = first_occurrences(hashes)
    held = np.zeros(len(hashes), bool)
    held[first] = heldout_mask(hashes[first], domains[first], cfg)
    return ~first, held


def choose_heldout(records: Sequence[tuple[str, str]], cfg: HeldoutConfig) -> set[str]:
    """Ids to hold out of (id, domain) pairs: per domain, the lowest-hash ids — ``fraction`` of them,
    within the bounds. The read stage makes the same choice without keeping ids."""
    ids = [doc_id for doc_id, _ in records]
    hashes = np.frombuffer(b"".join(map(id_hash, ids)), np.uint64)
    _, domains = np.unique([domain for _, domain in records], return_inverse=True)
    _, held = read_decisions(hashes, domains, cfg)
    return {doc_id for doc_id, chosen in zip(ids, held) if chosen}


def _scan_ids(sources: Sequence[SourceConfig], base_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Pass one: the id hash and domain number of every readable record, 12 bytes per document."""
    hashes, domains, codes = bytearray(), array("I"), {}
    for src in sources:
        for rec in read_source(src, ReadStats(), base_dir):
            if not rec.reason:
                hashes += id_hash(rec.id)
                domains.append(codes.setdefault(rec.domain, len(codes)))
    return np.frombuffer(hashes, np.uint64), np.frombuffer(domains, np.uint32)


def _row(rec: Record) -> dict:
    return {"id": rec.id, "text": rec.text, "domain": rec.domain, "source": rec.source, "meta": rec.meta}


class _HeldoutWriter:
    """Streams held-out documents into one Parquet file, a bounded batch at a time."""

    def __init__(self, path: Path, shard_docs: int, shard_bytes: int):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, SCHEMA, compression="zstd")
        self.buffer = ShardBuffer(self._flush, shard_docs, shard_bytes)
        self.docs = self.bytes = 0

    def _flush(self, rows: list[dict]) -> None:
        table = make_table(rows)
        self.writer.write_table(table)
        self.docs += table.num_rows
        self.bytes += text_bytes(table)

    def close(self) -> None:
        self.buffer.close()
        self.writer.close()
        os.replace(self.tmp, self.path)


def ingest(sources: Sequence[SourceConfig], out_dir: Path, heldout_path: Path, heldout: HeldoutConfig,
           *, base_dir: Path | None = None, shard_docs: int = 2000, shard_bytes: int = 64 << 20,
           keep_rejected: bool = True, progress: bool = True) -> StepStats:
    """Read every source into the read stage's StepFolder ``out_dir`` (kept shards under ``documents/``,
    ``rejected/``, ``stats.json``) and the held-out Parquet file.

    Two passes over the sources: the first hashes ids to choose the held-out set and to find duplicate
    ids, the second writes, deciding each record by its position in reading order. The stage writes
    into a temporary folder renamed into place at the end: it is either complete or absent.
    """
    t0 = time.perf_counter()
    duplicate, held = read_decisions(*_scan_ids(sources, base_dir), heldout)  # before any write: an
    tmp = out_dir.with_name(out_dir.name + ".tmp")                          # unreadable file leaves nothing
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    stats = ReadStats()
    counts = {"input_docs": 0, "kept_docs": 0, "kept_bytes": 0}
    n_shards = [0, 0]

    def flush_kept(rows: list[dict]) -> None:
        table = make_table(rows)
        counts["kept_bytes"] += text_bytes(table)
        write_parquet_atomic(table, StepFolder(tmp).documents / shard_name(n_shards[0]))
        n_shards[0] += 1

    def flush_rejected(rows: list[dict]) -> None:
        if keep_rejected:
            reasons = [r.pop("reason") for r in rows]
            write_parquet_atomic(with_reason(make_table(rows), reasons, "read"),
                                 StepFolder(tmp).rejected / shard_name(n_shards[1]))
            n_shards[1] += 1

    kept = ShardBuffer(flush_kept, shard_docs, shard_bytes)
    rejected = ShardBuffer(flush_rejected, shard_docs, shard_bytes)
    held_out = _HeldoutWriter(heldout_path, shard_docs, shard_bytes)
    position = 0  # index of the record among the readable ones, as in the first pass
    bar = tqdm(desc="read", unit="doc", disable=not progress)
    for rec in _records(sources, stats, base_dir):
        bar.update()
        counts["input_docs"] += 1
        if not rec.reason:
            if position >= len(duplicate):
                raise _changed(rec)
            if duplicate[position]:
                rec.reason = "duplicate_id"
                stats.reject("duplicate_id")
            elif held[position]:
                held_out.buffer.add(_row(rec))
            else:
                counts["kept_docs"] += 1
                kept.add(_row(rec))
            position += 1
        if rec.reason:
            rejected.add(_row(rec) | {"reason": rec.reason})
    bar.close()
    if position != len(duplicate):
        raise _changed(None)
    kept.close()
    rejected.close()
    held_out.close()
    if counts["kept_docs"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_empty(sources, stats)
    summary = StepStats(
        step="read", files=stats.files, input_docs=counts["input_docs"],
        input_bytes=counts["kept_bytes"] + held_out.bytes,
        kept_docs=counts["kept_docs"], kept_bytes=counts["kept_bytes"],
        removed_docs=sum(stats.rejected.values()), removed=dict(stats.rejected),
        counters={"heldout_docs": held_out.docs}, seconds=time.perf_counter() - t0)
    summary.write(StepFolder(tmp).stats)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return summary


def _records(sources: Sequence[SourceConfig], stats: ReadStats, base_dir: Path | None) -> Iterable[Record]:
    for src in sources:
        yield from read_source(src, stats, base_dir)


def _changed(rec: Record | None) -> TokenmillError:
    where = f" (at {rec.source})" if rec is not None else ""
    return TokenmillError(f"the sources changed while the read stage was reading them{where}: they are read "
                          f"twice; leave the files alone until the stage is done and run it again")


def raise_empty(sources: Sequence[SourceConfig], stats: ReadStats) -> None:
    paths = ", ".join(s.path for s in sources)
    raise TokenmillError(f"no readable document in {paths} ({stats.records} records, rejected: "
                         f"{stats.rejected or 'none'}); check `text_field` and the file format")
