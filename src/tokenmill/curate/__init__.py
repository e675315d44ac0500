"""Curation steps: each one class with typed params, run shard by shard by an executor.

Importing this package registers every built-in step (see ``STEPS``).
"""

from tokenmill.curate.base import STEPS, FilterStep, Step, StepParams, StepResult, register_step
from tokenmill.curate import (  # noqa: F401  (importing registers the steps)
    c4, decontam, dedup, extract, fineweb, gopher, langid, length, minhash, normalize, pii)

__all__ = ["STEPS", "FilterStep", "Step", "StepParams", "StepResult", "register_step"]
