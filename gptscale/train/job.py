"""What the ranks tell the batch script that started them, through GPTSCALE_JOB_DIR.

The SLURM scripts (launch/slurm/) set GPTSCALE_JOB_DIR to a folder of the job's own. Rank 0
writes there:

    preempt_lead_s   seconds before the time limit at which the ranks must be asked to save,
                     from the last save's measured duration and the slowest recent step
    stopped.json     {"step", "checkpoint"}: after a signal, the ranks saved this and stopped;
                     the script requeues only when it exists (a failed save is not requeued)

Unset (any other launcher), nothing is written.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path

from gptscale.atomic import write_text_atomic

LEAD_FILE = "preempt_lead_s"
STOPPED_FILE = "stopped.json"
# After the signal: the step under way, the save, and torchrun's and srun's shutdown. The save is
# doubled because the next one can be slower (a busier file system, a larger optimizer state).
SAVE_FACTOR, MARGIN_S = 2.0, 30


def preemption_lead(save_s: float, step_s: float) -> int:
    return math.ceil(SAVE_FACTOR * save_s + step_s) + MARGIN_S


class JobDir:
    def __init__(self, writer: bool, env=None):
        env = os.environ if env is None else env
        self.path = Path(env["GPTSCALE_JOB_DIR"]) if writer and env.get("GPTSCALE_JOB_DIR") else None
        self.recent_steps: deque[float] = deque(maxlen=20)

    def step_took(self, seconds: float) -> None:
        self.recent_steps.append(seconds)

    def save_took(self, seconds: float) -> int:
        """Record a save's duration; returns the preemption lead it implies (written for the script)."""
        lead = preemption_lead(seconds, max(self.recent_steps, default=0.0))
        if self.path is not None:
            write_text_atomic(self.path / LEAD_FILE, f"{lead}\n")
        return lead

    def stopped(self, step: int, checkpoint: Path) -> None:
        if self.path is not None:
            write_text_atomic(self.path / STOPPED_FILE, json.dumps({"step": step, "checkpoint": str(checkpoint)}))
