"""Main-text extraction from real HTML: resiliparse beside trafilatura, speed and quality.

The corpus holds 72 pages of the Python 3.11 documentation as built HTML (web_html) and the reST
sources they were built from (python_docs); a page and its source share a path
(``python3.11-doc/tutorial/classes.html`` ↔ ``pydoc/tutorial/classes.rst``). For each extractor:

- docs/s of ``extract_main_text`` over the pages (best of ``--repeats``);
- word-level precision, recall and F1 of the extracted text against its reST source (bags of
  lowercased words; reST markup words lower every extractor's precision alike);
- ``chrome_kept``: the share of Sphinx navigation phrases ("Previous topic", "Show Source",
  "Quick search"...) present on the pages that survive extraction — boilerplate the model would learn.

Build the corpus first (about 30 s): ``bash ../shared/corpora/build_corpus.sh``, or point
TOKENMILL_CORPUS at an existing ``out`` directory.

    PYTHONPATH=src python benchmarks/html_extract.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tokenmill.documents.html_text import extract_main_text

CORPUS = Path(os.environ.get("TOKENMILL_CORPUS", "/tmp/tokenmill-corpus/out"))
EXTRACTORS = ("resiliparse", "trafilatura")
WORD = re.compile(r"\w+")
SPHINX_CHROME = ("Previous topic", "Next topic", "This Page", "Report a Bug", "Show Source", "Quick search",
                 "Navigation", "Table of Contents", "Python Software Foundation", "Last updated",
                 "Found a bug", "Theme")


def load_pairs() -> list[tuple[str, str]]:
    """(html page, reST source) for every page whose source is in the corpus."""
    def rows(name: str) -> list[dict]:
        with open(CORPUS / f"{name}.jsonl", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    sources = {row["id"].removeprefix("pydoc/").removesuffix(".rst"): row["text"]
               for row in rows("python_docs")}
    pairs = []
    for page in rows("web_html"):
        key = page["id"].split("/", 1)[1].removesuffix(".html")
        if key in sources:
            pairs.append((page["text"], sources[key]))
    return pairs


def word_overlap(extracted: str, reference: str) -> tuple[float, float, float]:
    got, want = Counter(WORD.findall(extracted.lower())), Counter(WORD.findall(reference.lower()))
    common = sum((got & want).values())
    precision, recall = common / max(1, sum(got.values())), common / max(1, sum(want.values()))
    return precision, recall, 2 * precision * recall / max(1e-9, precision + recall)


def measure(extractor: str, pairs: list[tuple[str, str]], repeats: int) -> dict:
    pages = [page for page, _ in pairs]
    extract_main_text(pages[0], extractor)  # imports and caches outside the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        texts = [extract_main_text(page, extractor) for page in pages]
        best = min(best, time.perf_counter() - start)
    precision, recall, f1 = np.mean([word_overlap(t, src) for t, (_, src) in zip(texts, pairs)], axis=0)
    present = sum(phrase in page for page in pages for phrase in SPHINX_CHROME)
    kept = sum(phrase in page and phrase in text
               for page, text in zip(pages, texts) for phrase in SPHINX_CHROME)
    return {"docs_per_s": round(len(pages) / best, 1), "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "chrome_kept": round(kept / max(1, present), 4),
            "empty": sum(not t for t in texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    pairs = load_pairs()
    figures = {name: measure(name, pairs, args.repeats) for name in EXTRACTORS}
    speed = figures["resiliparse"]["docs_per_s"] / figures["trafilatura"]["docs_per_s"]
    print(json.dumps({"benchmark": "html_extract", "pages": len(pairs), **figures,
                      "resiliparse_speed_ratio": round(speed, 2)}))


if __name__ == "__main__":
    main()
