"""Curation steps: each one class with typed params, run shard by shard by an executor.

The steps a recipe can name are listed in ``tokenmill.steps``.
"""

from tokenmill.curate.base import FilterStep, Step, StepParams, StepResult

__all__ = ["FilterStep", "Step", "StepParams", "StepResult"]
