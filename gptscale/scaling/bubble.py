"""The pipeline bubble in theory, and the warning for a configuration that wastes most of a step."""
from __future__ import annotations

from gptscale.config import RunConfig
from gptscale.scaling.formulas import pipeline_bubble_fraction


def theoretical_idle_fraction(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """1F1B/GPipe bubble share of a step for equal stages: (p - 1) / (m + p - 1); interleaved
    over v chunks, ((p - 1)/v) / (m + (p - 1)/v)."""
    return pipeline_bubble_fraction(stages, micro_batches, virtual_stages)


def bubble_warning(cfg: RunConfig) -> str | None:
    """A warning when too few micro-batches leave the pipeline idle much of each step."""
    p, m = cfg.parallel.pp, cfg.train.grad_accum
    if m >= p:
        return None
    return (f"train.grad_accum={m} micro-batches < parallel.pp={p} stages: {theoretical_idle_fraction(p, m):.0%} of "
            f"every step is pipeline bubble; raise train.grad_accum (>= {4 * p} keeps it under "
            f"{theoretical_idle_fraction(p, 4 * p):.0%})")
