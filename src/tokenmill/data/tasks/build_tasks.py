"""Build the bundled harness tasks from the demo corpus: ``python src/tokenmill/data/tasks/build_tasks.py``.

Items come only from the documents the demo holds out for evaluation (``choose_heldout`` with the
default ``HeldoutConfig``, domain = file stem), so a model trained on the demo never saw them. A document
is cut into units by one pattern per domain (a verse, a line of verse, a prose sentence); each item
keeps the raw text before its unit as context, exactly as the model would have read it.

- ``cloze.jsonl.gz``: the context runs up to the unit's last word; the target is that word.
- ``realcont.jsonl.gz``: the context runs up to a unit; the choices are that unit and three units
  from elsewhere in the same domain's held-out text (never its neighbours), in a seeded order.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from tokenmill.documents.ingest import HeldoutConfig, choose_heldout

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"
SEED = 0
CONTEXT_CHARS = 300
N_CHOICES = 4
NEIGHBOURHOOD = 10  # units this close to the answer in its own document are never distractors
ITEMS_PER_DOMAIN = {"bible": 60, "shakespeare": 45, "python_docs": 45}
# Group 1 of each match is one unit of text.
UNIT = {
    "bible": re.compile(r"^ *\d+ (.{20,})$", re.M),
    "shakespeare": re.compile(
        r"^ *(?:[A-Z][A-Za-z]*\. )?+((?!Enter|Exit|Exeunt|Act|ACT|Scene|SCENE|Actus|Scena)[A-Z][^\[\]\n]{24,})$",
        re.M),
    "python_docs": re.compile(r"(?:(?<=[.!?] )|^)([A-Z](?:[^.!?`*:<>\[\]|\n]|\n(?! *\n)){30,}?[a-z][.!?])(?=\s)",
                              re.M),
}
LAST_WORD = re.compile(r" ([A-Za-z]{2,})\W*$")


def heldout_documents() -> dict[str, list[tuple[str, str]]]:
    """``{domain: [(id, text)]}`` of the demo's held-out documents, in file order."""
    docs = {}
    for domain in ITEMS_PER_DOMAIN:
        with gzip.open(DEMO / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as fh:
            docs[domain] = [(row["id"], row["text"]) for row in map(json.loads, fh)]
    held = choose_heldout([(doc_id, d) for d, rows in docs.items() for doc_id, _ in rows], HeldoutConfig())
    return {d: [(doc_id, text) for doc_id, text in rows if doc_id in held] for d, rows in docs.items()}


def context_before(text: str, end: int) -> str:
    """Up to ``CONTEXT_CHARS`` of ``text`` before ``end``, starting at a line start where there is one."""
    window = text[max(0, end - CONTEXT_CHARS) : end]
    line_start = window.find("\n")
    return window[line_start + 1 :] if 0 <= line_start < len(window) - 1 and end > CONTEXT_CHARS else window


def units(domain: str, docs: list[tuple[str, str]]) -> list[tuple[str, str, int, int, int]]:
    """``(doc_id, text, index in doc, start, end)`` of every unit with some text before it."""
    found = []
    for doc_id, text in docs:
        spans = [m.span(1) for m in UNIT[domain].finditer(text)]
        found += [(doc_id, text, i, start, end) for i, (start, end) in enumerate(spans) if start >= 100]
    return found


def cloze_items(domain: str, docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    items = []
    for doc_id, text, _, start, end in units(domain, docs):
        word = LAST_WORD.search(text[start:end])
        if word:
            word_start = start + word.start(1)
            items.append({"doc_id": doc_id, "domain": domain, "context": context_before(text, word_start - 1),
                          "target": " " + word.group(1)})
    return rng.sample(items, ITEMS_PER_DOMAIN[domain])


def realcont_items(domain: str, docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    pool = units(domain, docs)
    items = []
    for doc_id, text, index, start, end in rng.sample(pool, ITEMS_PER_DOMAIN[domain]):
        answer = text[start:end]
        far = {u[1][u[3] : u[4]] for u in pool if u[0] != doc_id or abs(u[2] - index) > NEIGHBOURHOOD}
        choices = [answer, *rng.sample(sorted(far - {answer}), N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"doc_id": doc_id, "domain": domain, "context": context_before(text, start),
                      "choices": choices, "label": choices.index(answer)})
    return items


def write_jsonl_gz(items: list[dict], path: Path) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime=0: rebuilding gives identical bytes
        fh.write("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode("utf-8"))


def build(out_dir: Path = HERE) -> dict[str, int]:
    """Write both tasks' data into ``out_dir``; return the item count of each."""
    rng = random.Random(SEED)
    docs = heldout_documents()
    counts = {}
    for name, make in (("cloze", cloze_items), ("realcont", realcont_items)):
        items = [item for domain in ITEMS_PER_DOMAIN for item in make(domain, docs[domain], rng)]
        rng.shuffle(items)  # domains interleaved, so a --limit run still sees all three
        write_jsonl_gz([{"id": i, **item} for i, item in enumerate(items)], out_dir / f"{name}.jsonl.gz")
        counts[name] = len(items)
    return counts


if __name__ == "__main__":
    print(build())
