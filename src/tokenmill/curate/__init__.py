"""Curation steps: each one class with typed params, run shard by shard by an executor.

Importing this package registers every built-in step (see ``STEPS``).
"""

from tokenmill.curate.base import STEPS, FilterStep, Step, StepParams, StepResult, register_step

__all__ = ["STEPS", "FilterStep", "Step", "StepParams", "StepResult", "register_step"]
