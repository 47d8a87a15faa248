"""How idle each pipeline stage was in a step: busy time (its forward and backward passes)
against the pipeline's span, gathered over the stages. Shared by both pipeline modes (pipe
times DeepSpeed's instructions, pipe_zero3 its own schedule's ops); the theory to compare
with is `scaling.bubble.theoretical_idle_fraction`."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from gptscale.parallel.primitives import comm_device
from gptscale.parallel.topology import Topology


class BusyTimer:
    """busy = the time inside `timed` blocks; span = from the step's first block's start to its
    last block's end. A stage's idle fraction is 1 - busy / (the longest span of any stage):
    bubble plus waiting for slower stages (stages start a step together: the previous one
    ended in collectives over all of them)."""

    def __init__(self):
        self.busy = 0.0
        self.start: float | None = None
        self.last_busy_end: float | None = None

    def begin(self) -> float:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        return now

    def end(self, started: float, busy: bool = True) -> None:
        if busy:
            self.last_busy_end = time.perf_counter()
            self.busy += self.last_busy_end - started

    def take(self) -> tuple[float, float]:
        """(busy seconds, seconds from the step's start to this stage's last busy moment); resets."""
        busy = self.busy
        span = (self.last_busy_end - self.start) if self.start is not None and self.last_busy_end else 0.0
        self.busy, self.start, self.last_busy_end = 0.0, None, None
        return busy, span


def idle_fractions_per_stage(busy: float, span: float, topo: Topology) -> list[float]:
    """Every stage's idle fraction over the pipeline's span of one step (`BusyTimer.take()`
    on each stage), in stage order, on every rank."""
    group = topo.get_pipe_parallel_group()
    device = comm_device()
    longest = torch.tensor([span], dtype=torch.float64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    mine = torch.tensor([1.0 - busy / longest.item() if longest.item() > 0 else float("nan")], dtype=torch.float64,
                        device=device)
    gathered = [torch.zeros_like(mine) for _ in range(topo.layout.pp)]
    dist.all_gather(gathered, mine, group=group)
    return [g.item() for g in gathered]
