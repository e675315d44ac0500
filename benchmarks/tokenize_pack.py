"""Tokenize+pack throughput on the real corpus, beside raw ``tokenizers`` batch encoding of the same texts.

Trains a 16k-vocab byte-level BPE on a sample, writes ~30 MB of documents (all domains, shuffled) as
Parquet shards, then alternates timed runs of ``pack_documents`` (Parquet in, token shards + index
out) and of the bare Rust ``encode_batch`` (what ``pack_documents`` calls) and ``encode_batch_fast``
(the same without character offsets) on the texts already in memory, in the same batches. Each
run starts from a fresh copy of the tokenizer so neither side profits from the other's BPE cache;
the median of ``--repeats`` runs of each is reported.

Build the corpus first (about 30 s): ``bash ../shared/corpora/build_corpus.sh``, or point
TOKENMILL_CORPUS at an existing ``out`` directory.

    PYTHONPATH=src python benchmarks/tokenize_pack.py [--mb 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer

from tokenmill.documents.schema import make_table
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer

BATCH_DOCS = 1000


def read_corpus(corpus: Path, max_bytes: int) -> list[dict]:
    """Documents of every domain, shuffled, until ``max_bytes`` of text."""
    docs = [json.loads(line) for path in sorted(corpus.glob("*.jsonl")) for line in path.open()]
    random.Random(0).shuffle(docs)
    picked, total = [], 0
    for doc in docs:
        if total >= max_bytes:
            break
        picked.append(doc)
        total += len(doc["text"].encode())
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30, help="MB of text to pack")
    parser.add_argument("--shards", type=int, default=8, help="Parquet shards the text is split into")
    parser.add_argument("--workers", type=int, default=2, help="shards pack_documents packs at once")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs of runs; medians are reported")
    args = parser.parse_args()

    corpus = Path(os.environ.get("TOKENMILL_CORPUS", "/tmp/tokenmill-corpus/out"))
    if not any(corpus.glob("*.jsonl")):
        sys.exit(f"no corpus at {corpus}: build it (see this file's docstring) or set TOKENMILL_CORPUS")
    docs = read_corpus(corpus, int(args.mb * 1e6))
    texts = [doc["text"] for doc in docs]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        tokenizer = train_tokenizer(texts[::3], 16384, work / "tokenizer")
        train_s = time.perf_counter() - started

        shards = []
        for i in range(args.shards):
            shards.append(work / f"docs-{i:02d}.parquet")
            pq.write_table(make_table(docs[i :: args.shards]), shards[-1])
        in_shard_order = [text for i in range(args.shards) for text in texts[i :: args.shards]]
        definition = tokenizer.backend_tokenizer.to_str()

        def raw_encode(method: str) -> tuple[float, int]:
            encoder = Tokenizer.from_str(definition)
            encode = getattr(encoder, method)
            started = time.perf_counter()
            n = 0
            for i in range(0, len(in_shard_order), BATCH_DOCS):
                encodings = encode(in_shard_order[i : i + BATCH_DOCS], add_special_tokens=False)
                n += sum(len(encoding.ids) for encoding in encodings)
            return time.perf_counter() - started, n

        def pack() -> tuple[float, int]:
            out = work / "tokens"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            summary = pack_documents(shards, tokenizer, out, batch_docs=BATCH_DOCS, workers=args.workers)
            return time.perf_counter() - started, summary["n_tokens"] - summary["n_docs"]

        runs = {"pack": pack, "encode_batch": partial(raw_encode, "encode_batch"),
                "encode_batch_fast": partial(raw_encode, "encode_batch_fast")}
        timings = {name: [] for name in runs}
        for repeat in range(args.repeats):  # interleaved, in a rotating order, so drift hits all alike
            names = list(runs)[repeat % 3 :] + list(runs)[: repeat % 3]
            for name in names:
                timings[name].append(runs[name]())
        tokens = timings["pack"][0][1]
        for name in ("encode_batch", "encode_batch_fast"):
            if timings[name][0][1] != tokens:
                sys.exit(f"pack wrote {tokens} text tokens but {name} gives {timings[name][0][1]}")
        seconds = {name: statistics.median(t for t, _ in runs_) for name, runs_ in timings.items()}
        ratio = {name: statistics.median(raw[0] / packed[0] for raw, packed in zip(timings[name], timings["pack"]))
                 for name in ("encode_batch", "encode_batch_fast")}
        pack_s = seconds["pack"]

    print(
        json.dumps(
            {
                "benchmark": "tokenize_pack",
                "tokens": tokens,
                "docs": len(docs),
                "text_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 1),
                "cores": len(os.sched_getaffinity(0)),
                "vocab_size": len(tokenizer),
                "train_tokenizer_s": round(train_s, 2),
                "pack_s": round(pack_s, 3),
                "tokens_per_s": round(tokens / pack_s),
                "raw_encode_s": {name: round(seconds[name], 3) for name in ratio},
                "raw_encode_tokens_per_s": {name: round(tokens / seconds[name]) for name in ratio},
                "ratio": {name: round(value, 3) for name, value in ratio.items()},
                "pack_workers": args.workers,
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
