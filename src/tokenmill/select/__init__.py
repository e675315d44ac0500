"""Data selection: steps that score every document and keep the ones worth training on.

Each method is a curation step (see ``tokenmill.select.base.ScoreStep``), so it runs in the same
pipeline, on the same executors, with the same counts and rejected/ folders as cleaning steps.
Importing this package registers every selection step.
"""

from tokenmill.select.base import KeepRule, ScoreParams, ScoreStep, TargetSet
from tokenmill.select import (  # noqa: F401  (importing registers the steps)
    color_filter, dsir, perplexity, preselect, quality)

__all__ = ["KeepRule", "ScoreParams", "ScoreStep", "TargetSet"]
