"""Learning-rate schedule: linear warmup, then constant, cosine or linear decay to lr * min_lr_ratio.

The LR is a pure function of the optimizer step, set on every part's optimizer before each step, so nothing
about it needs checkpointing and a resumed run uses exactly the rates of an uninterrupted one. Skipped
(non-finite) steps count like any other step.
"""
from __future__ import annotations

import math

from pipeline.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based: the first update uses step 1).

    Warmup: step/warmup_steps * lr for step <= warmup_steps. Decay runs over the remaining steps so the last
    step (step == max_steps) uses exactly lr * min_lr_ratio for cosine and linear schedules.
    """
    if optim.warmup_steps > 0 and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    floor = optim.lr * optim.min_lr_ratio
    span = max_steps - optim.warmup_steps
    if span <= 0:
        return optim.lr
    progress = min(max((step - optim.warmup_steps) / span, 0.0), 1.0)
    if optim.schedule == "linear":
        return floor + (optim.lr - floor) * (1.0 - progress)
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
