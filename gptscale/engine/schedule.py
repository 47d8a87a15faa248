"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr (or constant)."""
from __future__ import annotations

import math

from gptscale.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.decay == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.decay == "cosine" else 1 - progress
    return t.min_lr + (t.lr - t.min_lr) * shape


def lr_factor(t: TrainConfig):
    """For torch's LambdaLR, whose base lr is train.lr."""
    return lambda step: lr_at(step, t) / t.lr
