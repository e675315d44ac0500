"""Data selection and mixing: steps that score every document and keep the ones worth training on, the
``cluster`` step that labels documents with a domain for mixtures, and mixture search's pure algorithm
(``mixture_search``).

Each step is a curation step (see ``tokenmill.select.base.ScoreStep``), so it runs in the same
pipeline, on the same executors, with the same counts and rejected/ folders as cleaning steps. The
steps a recipe can name are listed in ``tokenmill.steps``.
"""

from tokenmill.select.base import KeepRule, ScoreParams, ScoreStep, TargetSet

__all__ = ["KeepRule", "ScoreParams", "ScoreStep", "TargetSet"]
