"""`gptscale sweep`: a grid of model sizes x token budgets, each a normal training run, and the
scaling-law fit of their final losses."""
from __future__ import annotations


def add_parsers(sub) -> None:
    pass
