"""`gptscale estimate`: parameters, FLOPs, memory per device, bubble and time on paper, and
`--search` for the best layout of a cluster."""
from __future__ import annotations


def add_parsers(sub) -> None:
    pass
