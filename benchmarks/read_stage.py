"""The read stage on one large JSON Lines file: throughput and peak memory, beside two common ways to read it.

Writes a ``--mb`` file of real documents (the corpus repeated under fresh ids), then runs, each in its
own process so peak RSS is that reader's alone:

* **tokenmill**: ``documents.ingest`` — both passes (id hashes, then writing), Parquet shards, the
  held-out split and stats: the whole stage as ``tokenmill run`` does it;
* **json_loop**: ``json.loads`` on every line, nothing kept: the floor of any Python JSONL reader;
* **pyarrow**: ``pyarrow.json.read_json`` of the whole file into one table: fast, but its memory grows
  with the file.

The DESIGN bar is memory: a 10 GB input must not need 10 GB of RAM, so the figure that matters is our
peak RSS against the file size; throughput shows what the two passes cost next to a bare parse.

    PYTHONPATH=src python benchmarks/read_stage.py [--mb 1000] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READERS = {
    "tokenmill": """
from pathlib import Path
from tokenmill.documents.ingest import HeldoutConfig, ingest
from tokenmill.documents.readers import SourceConfig
out = Path(sys.argv[2])
summary = ingest([SourceConfig(path=sys.argv[1])], out / "read", out / "heldout.parquet", HeldoutConfig(),
                 progress=False)
docs = summary.kept_docs + summary.counters["heldout_docs"]
""",
    "json_loop": """
docs = 0
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        json.loads(line)
        docs += 1
""",
    "pyarrow": """
import pyarrow.json
docs = pyarrow.json.read_json(sys.argv[1], read_options=pyarrow.json.ReadOptions(block_size=64 << 20)).num_rows
""",
}

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the parent process.
MEASURE = """
import json, re, sys, time
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({{"docs": docs, "seconds": seconds, "peak_rss_mb": peak_kb / 1024}}))
"""


def write_input(corpus: Path, path: Path, target_bytes: int) -> int:
    """``target_bytes`` of JSON lines (id, text, domain) cycling through the corpus's documents."""
    lines = [line.rstrip("\n") for file in sorted(corpus.glob("*.jsonl")) for line in file.open(encoding="utf-8")]
    if not lines:
        sys.exit(f"no *.jsonl in {corpus}: build the corpus (bash ../shared/corpora/build_corpus.sh) or set "
                 "TOKENMILL_CORPUS")
    written = n = 0
    with path.open("w", encoding="utf-8") as out:
        while written < target_bytes:
            doc = json.loads(lines[n % len(lines)])
            line = json.dumps({"id": f"doc-{n}", "text": doc["text"], "domain": doc.get("domain", "web")}) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def measure(reader: str, source: Path, scratch: Path) -> dict:
    code = MEASURE.format(body=READERS[reader])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(source), str(scratch)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000, help="size of the generated input (MB)")
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("TOKENMILL_CORPUS",
                                                                            "/tmp/tokenmill-corpus/out")))
    parser.add_argument("--readers", nargs="+", choices=sorted(READERS), default=list(READERS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tokenmill-read-bench-") as tmp:
        source = Path(tmp) / "input.jsonl"
        n_docs = write_input(args.corpus, source, args.mb << 20)
        size_mb = source.stat().st_size / 2**20
        results = {}
        for reader in args.readers:
            scratch = Path(tmp) / reader
            scratch.mkdir()
            r = measure(reader, source, scratch)
            shutil.rmtree(scratch)
            assert r["docs"] == n_docs, f"{reader} read {r['docs']} of {n_docs} documents"
            results[reader] = {"seconds": round(r["seconds"], 2), "mb_per_s": round(size_mb / r["seconds"], 1),
                               "peak_rss_mb": round(r["peak_rss_mb"], 1)}
    ours = results.get("tokenmill")
    print(json.dumps({
        "benchmark": "read_stage", "input_mb": round(size_mb, 1), "docs": n_docs, "readers": results,
        "peak_rss_over_input": round(ours["peak_rss_mb"] / size_mb, 3) if ours else None,
        "speed_vs_json_loop": round(results["json_loop"]["seconds"] / ours["seconds"], 3)
        if ours and "json_loop" in results else None,
        "peak_rss_vs_pyarrow": round(ours["peak_rss_mb"] / results["pyarrow"]["peak_rss_mb"], 3)
        if ours and "pyarrow" in results else None,
    }))


if __name__ == "__main__":
    main()
