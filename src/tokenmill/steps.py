"""Every step a recipe can name, listed here and nowhere else.

Curation steps clean and deduplicate; selection steps score documents and keep the best. Both share
the step interface (``tokenmill.curate.base.Step``), so the recipe, the pipeline and the executors treat
them alike. A new step is one class and one line below.
"""

from __future__ import annotations

from tokenmill.curate.base import Step
from tokenmill.curate.c4 import C4
from tokenmill.curate.decontam import Decontaminate
from tokenmill.curate.dedup import ExactDedup, LineDedup
from tokenmill.curate.extract import Extract
from tokenmill.curate.fineweb import FineWebQuality
from tokenmill.curate.gopher import GopherQuality, GopherRepetition
from tokenmill.curate.langid import Langid
from tokenmill.curate.length import LengthFilter
from tokenmill.curate.minhash import MinHashDedup
from tokenmill.curate.normalize import Normalize
from tokenmill.curate.pii import PII
from tokenmill.select.cluster import Cluster
from tokenmill.select.color_filter import ColorFilter
from tokenmill.select.dsir import Dsir
from tokenmill.select.perplexity import PerplexityBand
from tokenmill.select.preselect import PreSelect
from tokenmill.select.quality import QualityClassifier

CURATION_STEPS: tuple[type[Step], ...] = (
    Extract, Normalize, Langid, LengthFilter, GopherQuality, GopherRepetition, C4, FineWebQuality, PII,
    ExactDedup, MinHashDedup, LineDedup, Decontaminate)
SELECTION_STEPS: tuple[type[Step], ...] = (QualityClassifier, Dsir, PerplexityBand, ColorFilter, PreSelect,
                                             Cluster)


def _by_name(classes: tuple[type[Step], ...]) -> dict[str, type[Step]]:
    steps: dict[str, type[Step]] = {}
    for cls in classes:
        if cls.name in steps:
            raise ValueError(f"two steps named {cls.name!r}: {steps[cls.name]} and {cls}")
        steps[cls.name] = cls
    return steps


STEPS: dict[str, type[Step]] = _by_name(CURATION_STEPS + SELECTION_STEPS)
