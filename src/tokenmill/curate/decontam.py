"""Benchmark decontamination: drop (or flag) training documents that share long n-grams with eval sets.

GPT-3's rule: a document is contaminated when it contains a 13-word n-gram of some eval item (words
lowercased, punctuation ignored, tokenised as in the dedup steps). The eval n-gram index is built once,
when the step is created, from the files its params name, and travels to workers as two numpy arrays
(sorted n-gram hashes and the eval item of each); no corpus-wide fit is needed.

Which eval items were hit: ``process`` runs in worker processes, so each shard reports hits in its
counters, ``"hit:<item id>": number of the shard's documents containing an n-gram of that item``
(counted for contaminated documents only). Executors sum counters over shards, and
``Decontaminate.hits_report(counters)`` turns the sums into ``{item id: documents}``; its length is the
number of eval items hit. Counters work alike in "drop" and "flag" mode, where nothing is removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa
from pydantic import Field

from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.hashing import ngram_hashes, word_hashes
from tokenmill.documents.schema import with_reason

HIT_PREFIX = "hit:"


def read_eval_items(path: Path, text_field: str, id_field: str | None) -> tuple[list[str], list[str]]:
    """``(item ids, texts)`` of one eval file: JSON Lines records, or a .txt file with one item per line.

    An item's id is its ``id_field`` value when given, else ``<path>:<line number>``.
    """
    if not path.is_file():
        raise TokenmillError(f"decontaminate: eval file {path} does not exist; fix eval_paths")
    if path.suffix not in (".jsonl", ".txt"):
        raise TokenmillError(
            f"decontaminate: cannot read {path}: use .jsonl (one JSON record per line, text in field "
            f"{text_field!r}) or .txt (one item per line)"
        )
    ids, texts = [], []
    with path.open(encoding="utf-8", errors="strict") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            item_id, text = f"{path}:{number}", line
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TokenmillError(f"decontaminate: {path}:{number} is not valid JSON ({err})") from err
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise TokenmillError(
                        f"decontaminate: {path}:{number} has no string field {text_field!r}; "
                        "set text_field to the field holding the eval text"
                    )
                text = record[text_field]
                if id_field is not None:
                    if id_field not in record:
                        raise TokenmillError(f"decontaminate: {path}:{number} has no id field {id_field!r}")
                    item_id = str(record[id_field])
            ids.append(item_id)
            texts.append(text)
    return ids, texts


class Decontaminate(Step):
    """Remove (or flag) documents containing an n-gram of an evaluation item."""

    class Params(StepParams):
        step: Literal["decontaminate"] = "decontaminate"
        eval_paths: list[Path] = Field(
            min_length=1, description="Eval sets to protect: .jsonl files (one record per line) or .txt "
            "files (one item per line).",
        )
        text_field: str = Field("text", description="Field of each .jsonl record that holds the eval text.")
        id_field: str | None = Field(
            None, description="Field of each .jsonl record naming the item in hit reports; default "
            "'<path>:<line number>'.",
        )
        n: int = Field(
            13, ge=1, description="Words per n-gram (GPT-3 used 13). An item shorter than n words is one "
            "n-gram, so it matches only a document with exactly its words: lower n for short items.",
        )
        mode: Literal["drop", "flag"] = Field(
            "drop", description="'drop' removes contaminated documents (reason 'contaminated'); 'flag' "
            "keeps them and adds a boolean column.",
        )
        min_matches: int = Field(
            1, ge=1, description="Distinct eval n-grams a document must contain to count as contaminated.",
        )
        flag_column: str = Field("contaminated", description="Name of the boolean column added in 'flag' mode.")

    def __init__(self, params: StepParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        p = self.params
        self.item_ids: list[str] = []
        texts: list[str] = []
        for path in p.eval_paths:
            ids, item_texts = read_eval_items(Path(path), p.text_field, p.id_field)
            self.item_ids += ids
            texts += item_texts
        grams, offsets = ngram_hashes(*word_hashes(pa.array(texts, pa.large_string())), p.n)
        items = np.repeat(np.arange(len(texts)), np.diff(offsets))
        index = np.unique(np.stack([grams, items.astype(np.uint64)], axis=1), axis=0)  # sorted by n-gram
        self.grams, self.gram_items = index[:, 0], index[:, 1].astype(np.int64)

    @staticmethod
    def hits_report(counters: Mapping[str, int]) -> dict[str, int]:
        """``{eval item id: contaminated documents containing it}`` from the step's summed counters."""
        return {key[len(HIT_PREFIX):]: value for key, value in counters.items() if key.startswith(HIT_PREFIX)}

    def process(self, table: pa.Table) -> StepResult:
        grams, offsets = ngram_hashes(*word_hashes(table["text"]), self.params.n)
        docs = np.repeat(np.arange(table.num_rows), np.diff(offsets))
        in_eval = np.searchsorted(self.grams, grams, "right") > np.searchsorted(self.grams, grams, "left")
        matches = np.unique(np.stack([docs[in_eval].astype(np.uint64), grams[in_eval]], axis=1), axis=0)
        contaminated = np.bincount(matches[:, 0].astype(np.int64), minlength=table.num_rows) >= self.params.min_matches
        counters = {"contaminated_docs": int(contaminated.sum()), **self._hits(matches, contaminated)}
        if self.params.mode == "flag":
            flagged = table.append_column(self.params.flag_column, pa.array(contaminated))
            return StepResult(flagged, with_reason(flagged.slice(0, 0), [], self.name), counters)
        result = self.split(table, np.where(contaminated, "contaminated", ""))
        result.counters = counters
        return result

    def _hits(self, matches: np.ndarray, contaminated: np.ndarray) -> dict[str, int]:
        """Counters ``hit:<item id>``: contaminated documents sharing an n-gram with each item."""
        matches = matches[contaminated[matches[:, 0].astype(np.int64)]]
        starts = np.searchsorted(self.grams, matches[:, 1], "left")
        lengths = np.searchsorted(self.grams, matches[:, 1], "right") - starts
        owner = np.repeat(np.arange(len(matches)), lengths)  # one row per (match, item having that n-gram)
        index = np.arange(lengths.sum()) + np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        doc_items = np.unique(np.stack([matches[owner, 0], self.gram_items[index].astype(np.uint64)], axis=1), axis=0)
        items, counts = np.unique(doc_items[:, 1].astype(np.int64), return_counts=True)
        return {f"{HIT_PREFIX}{self.item_ids[i]}": int(c) for i, c in zip(items, counts)}
