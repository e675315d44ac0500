"""Learning-rate multipliers (of the peak lr) as pure functions of the optimizer step.

Being stateless, a resumed run needs only the step to be back on its curve. Steps count from 0;
warm-up rises linearly to 1 at step ``warmup_steps - 1``, and decaying schedules reach
``min_lr_ratio`` exactly at the last step, ``max_steps - 1``.
"""

from __future__ import annotations

import math

from tokenmill.train.config import TrainConfig


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def _progress(step: int, start: int, max_steps: int) -> float:
    """Fraction of the way from ``start`` to the last step, clipped to [0, 1]."""
    return min(1.0, max(0.0, (step - start) / max(1, max_steps - 1 - start)))


def constant(step: int, warmup_steps: int) -> float:
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    p = _progress(step, warmup_steps, max_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


DECAY_SHAPES = {
    "linear": lambda p: 1 - p,
    "sqrt": lambda p: 1 - math.sqrt(p),
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
}


def wsd(
    step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float, decay_fraction: float, decay_shape: str
) -> float:
    """Warmup-stable-decay: flat at the peak until the last ``decay_fraction`` of training, then decay.
    A stable-phase checkpoint can be branched into a short decay at any time, which makes
    data-mixture comparisons cheap."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
    if step < decay_start:
        return 1.0
    p = _progress(step, decay_start, max_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * DECAY_SHAPES[decay_shape](p)


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    if cfg.schedule == "cosine":
        return cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return wsd(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.decay_fraction, cfg.decay_shape)
    return constant(step, cfg.warmup_steps)
