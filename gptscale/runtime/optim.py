"""The optimizer's parameter groups and the learning-rate schedule, for every run mode."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from gptscale.config import TrainConfig
from gptscale.model.gpt import weight_decay_applies


def param_groups(module: nn.Module, canonical: dict[str, nn.Parameter], weight_decay: float,
                 trains: Callable[[str], bool]) -> list[dict]:
    """AdamW groups over `module`'s parameters in its own order (ZeRO flattens them in this
    order, so it decides how partitions and norms are summed), decayed by the model's rule
    (by canonical name), and only those the task `trains`; the others are frozen."""
    names = {id(param): name for name, param in canonical.items()}
    decay, rest = [], []
    for param in module.parameters():
        name = names[id(param)]
        if not trains(name):
            param.requires_grad_(False)
            continue
        # ZeRO-3 has already partitioned parameters built under zero.Init (param.shape is then
        # (0,)); ds_shape is the whole tensor's shape.
        shape = getattr(param, "ds_shape", param.shape)
        (decay if weight_decay_applies(name, shape) else rest).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or linear
    decay to min_lr (or constant)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.decay == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.decay == "cosine" else 1 - progress
    return t.min_lr + (t.lr - t.min_lr) * shape


def lr_scheduler(t: TrainConfig):
    """For deepspeed.initialize: torch's LambdaLR over the optimizer, whose base lr is train.lr."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)
