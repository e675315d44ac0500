"""Curation speed against datatrove: the same rules and dedup over the same corpus on 2 cores.

Pipeline: normalize → gopher_quality → gopher_repetition → exact_dedup → minhash_dedup (5-word
shingles, 16 bands × 7 rows). tokenmill runs it with ``run_pipeline`` on a 2-worker ``LocalExecutor``
from the read stage's shards (read time reported apart, held-out fraction 0 so both tools see every
document). datatrove runs its equivalent with ``LocalPipelineExecutor`` (2 workers) from the JSONL
files: JsonlReader → FTFYFormatter (its only normalising formatter; NFC) → GopherQualityFilter →
GopherRepetitionFilter → exact dedup (ExactDedupSignature / ExactFindDedups / ExactDedupFilter on the
lowercased, whitespace-collapsed text, like ours) → MinHash's four stages. Reported: documents/s of
each, their ratio (bar ≥ 3), per-step removal counts of both, and the Jaccard of the kept id sets.

datatrove lives in its own virtualenv, so this file runs twice: as the benchmark (tokenmill's
interpreter) and, with ``--datatrove-child``, as the datatrove half in the venv's interpreter. That
is why each half imports its library inside its own function. Setup (once, a few minutes)::

    python -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install 'datatrove[processing]' spacy orjson

(datatrove's JsonlReader refuses to start without orjson, which its extras do not pull in.)

datatrove 0.10 tokenises English words with a blank spaCy pipeline (rules only, nothing downloaded),
so the run is offline without patching anything. Corpus: ``bash ../shared/corpora/build_corpus.sh``
(writes /tmp/tokenmill-corpus/out) or set TOKENMILL_CORPUS.
Run: ``PYTHONPATH=src python benchmarks/curation.py [--workers 2] [--datatrove-python PATH]``.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CORPUS = Path(os.environ.get("TOKENMILL_CORPUS", "/tmp/tokenmill-corpus/out"))
DATATROVE_PYTHON = os.environ.get("TOKENMILL_DATATROVE_PYTHON", "/tmp/dt-venv/bin/python")
NGRAM, BANDS, ROWS = 5, 16, 7
NOTES = [
    "datatrove's words are spaCy tokens (punctuation is a token of its own), ours whitespace tokens: its "
    "alpha-words rule removes far more, so its dedup stages see fewer documents (favours datatrove)",
    "FTFYFormatter(NFC) stands in for normalize: datatrove has no whitespace normaliser",
    "datatrove runs one task per input file on its 2 workers: with tasks=2 it assigns whole files statically "
    "(on the real corpus one worker would get 96 of its 123 MB)",
    "our minhash_dedup verifies candidate pairs from the signatures; datatrove's does not",
    "wall times depend on other work on the machine (load_average_1min, before and after); cpu_ratio does not",
]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (pool workers, subprocesses):
    the figure that stays fair when other work shares the machine and wall time does not."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage,
                                                    (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def run_tokenmill(corpus: Path, work: Path, workers: int) -> dict:
    from tokenmill.curate.dedup import ExactDedup
    from tokenmill.curate.gopher import GopherQuality, GopherRepetition
    from tokenmill.curate.minhash import MinHashDedup
    from tokenmill.curate.normalize import Normalize
    from tokenmill.curate.pipeline import run_pipeline
    from tokenmill.documents.ingest import HeldoutConfig, ingest
    from tokenmill.documents.readers import SourceConfig
    from tokenmill.documents.shards import list_shards, read_shard
    from tokenmill.executors.local import LocalExecutor
    from tokenmill.runfolder import RunFolder

    t0 = time.perf_counter()
    folder = RunFolder(work)
    read = ingest([SourceConfig(path=str(corpus / "*.jsonl"))], folder.read.root, folder.heldout,
                  HeldoutConfig(fraction=0.0), progress=False)
    read_seconds = time.perf_counter() - t0
    steps = [Normalize(), GopherQuality(), GopherRepetition(), ExactDedup(),
             MinHashDedup(ngram=NGRAM, bands=BANDS, rows=ROWS, num_perm=BANDS * ROWS)]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    with LocalExecutor(workers, progress=False) as executor:
        last, stats = run_pipeline(steps, folder.read.documents, folder, executor, keep_rejected=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    kept = [i for shard in list_shards(last.documents) for i in read_shard(shard).column("id").to_pylist()]
    return {"docs": read.kept_docs, "read_seconds": read_seconds, "seconds": seconds, "cpu_seconds": cpu,
            "kept_ids": kept,
            "removed": {s.step: {"docs": s.removed_docs, **({"reasons": s.removed} if s.removed else {})}
                        for s in stats},
            "read_removed": read.removed}


def run_datatrove(corpus: Path, work: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def normalized_text(doc) -> str:  # our exact_dedup's comparison: lowercased, whitespace collapsed
        return " ".join(doc.text.lower().split())

    files = len(list(corpus.glob("*.jsonl")))
    exact = ExactDedupConfig(content_getter=normalized_text)
    minhash = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS)

    def filtered():  # the rule stages' output, reread by each dedup stage that needs documents
        return JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl")

    def after_exact():
        return [filtered(), ExactDedupFilter(str(work / "exact_dups"), config=exact)]

    stages = [
        ("rules", files, [JsonlReader(str(corpus), glob_pattern="*.jsonl"), FTFYFormatter(normalization="NFC"),
                          GopherQualityFilter(), GopherRepetitionFilter(),
                          JsonlWriter(str(work / "filtered"), compression=None)]),
        ("exact_signature", files, [filtered(), ExactDedupSignature(str(work / "exact_sigs"), config=exact)]),
        ("exact_find", 1, [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact)]),
        ("minhash_signature", files, [*after_exact(),
                                      MinhashDedupSignature(str(work / "mh_sigs"), config=minhash)]),
        ("minhash_buckets", BANDS, [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"),
                                                        config=minhash)]),
        ("minhash_cluster", 1, [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_ids"),
                                                    config=minhash)]),
        ("minhash_filter", files, [*after_exact(), MinhashDedupFilter(str(work / "mh_ids")),
                                   JsonlWriter(str(work / "kept"), compression=None)]),
    ]
    t0 = time.perf_counter()
    step_stats = {}
    for name, tasks, pipeline in stages:
        # fork: workers are children of this process, so the parent's CPU count includes them.
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), start_method="fork",
                              logging_dir=str(work / "logs" / name)).run()
        step_stats[name] = json.loads((work / "logs" / name / "stats.json").read_text())
    seconds = time.perf_counter() - t0
    kept = [json.loads(line)["id"] for path in sorted((work / "kept").glob("*.jsonl")) for line in path.open()]
    return {"seconds": seconds, "tasks": files, "kept_ids": kept, "removed": _datatrove_removals(step_stats)}


# Our step name -> the datatrove block doing its work (matched on the block's display name).
_DATATROVE_BLOCKS = {"normalize": "FTFY", "gopher_quality": "Gopher Quality", "gopher_repetition": "Gopher Repetition",
                     "exact_dedup": "exact-deduplication stage 3", "minhash_dedup": "MinHash stage 4"}


def _datatrove_removals(step_stats: dict) -> dict:
    """Documents each filtering block dropped, by our step names, with datatrove's reasons."""
    blocks = [block for stage in ("rules", "minhash_filter") for block in step_stats[stage]]
    removed = {}
    for step, marker in _DATATROVE_BLOCKS.items():
        stats = next(b["stats"] for b in blocks if marker in b["name"])
        reasons = {k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_")}
        removed[step] = {"docs": stats.get("dropped", 0), **({"reasons": reasons} if reasons else {})}
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datatrove-python", default=DATATROVE_PYTHON)
    parser.add_argument("--datatrove-child", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not any(CORPUS.glob("*.jsonl")):
        raise SystemExit(f"no *.jsonl under {CORPUS}: run ../shared/corpora/build_corpus.sh or set TOKENMILL_CORPUS")
    if args.datatrove_child:
        result = run_datatrove(CORPUS, Path(args.datatrove_child), args.workers)
        Path(args.datatrove_child, "result.json").write_text(json.dumps(result))
        return

    load = [round(os.getloadavg()[0], 1)]  # other work on the machine distorts wall times: say how much
    work = Path(tempfile.mkdtemp(prefix="tokenmill-curation-"))
    try:
        ours = run_tokenmill(CORPUS, work / "tokenmill", args.workers)
        (work / "datatrove").mkdir()
        cpu0 = cpu_seconds()
        child = subprocess.run([args.datatrove_python, __file__, "--workers", str(args.workers),
                                "--datatrove-child", str(work / "datatrove")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if child.returncode:  # its traceback (a missing package, say) is the only clue to what went wrong
            raise SystemExit(f"the datatrove half ({args.datatrove_python}) failed with exit status "
                             f"{child.returncode}; the end of its stderr:\n{child.stderr[-4000:]}")
        theirs = json.loads((work / "datatrove" / "result.json").read_text())
        theirs["cpu_seconds"] = cpu_seconds() - cpu0  # includes the interpreter's start and imports
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load.append(round(os.getloadavg()[0], 1))
    docs = ours["docs"]
    ours_kept, theirs_kept = set(ours["kept_ids"]), set(theirs["kept_ids"])
    print(json.dumps({
        "benchmark": "curation", "corpus": str(CORPUS), "docs": docs, "workers": args.workers,
        "tokenmill_docs_per_s": round(docs / ours["seconds"], 1),
        "datatrove_docs_per_s": round(docs / theirs["seconds"], 1),
        "ratio": round(theirs["seconds"] / ours["seconds"], 2),
        "ratio_with_read": round(theirs["seconds"] / (ours["seconds"] + ours["read_seconds"]), 2),
        "cpu_ratio": round(theirs["cpu_seconds"] / ours["cpu_seconds"], 2),
        "tokenmill_cpu_seconds": round(ours["cpu_seconds"], 1),
        "datatrove_cpu_seconds": round(theirs["cpu_seconds"], 1),
        "load_average_1min": load,
        "tokenmill_seconds": round(ours["seconds"], 2), "tokenmill_read_seconds": round(ours["read_seconds"], 2),
        "datatrove_seconds": round(theirs["seconds"], 2), "datatrove_tasks_per_stage": theirs["tasks"],
        "kept": {"tokenmill": len(ours_kept), "datatrove": len(theirs_kept)},
        "kept_jaccard": round(len(ours_kept & theirs_kept) / max(1, len(ours_kept | theirs_kept)), 4),
        "removed": {"tokenmill": ours["removed"], "tokenmill_read": ours["read_removed"],
                    "datatrove": theirs["removed"]},
        "notes": NOTES,
    }))


if __name__ == "__main__":
    main()
