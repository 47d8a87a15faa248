"""Fault injection for the test suite: GPTSCALE_FAULT makes a rank fail the way a crashed or
preempted node does, at a named point. Unset (always, outside the tests), it does nothing.

    die_in_save:STEP:RANK     RANK exits (code 9) in the middle of saving STEP
    kill_at_step:STEP:RANK    RANK is SIGKILLed after STEP, in the first attempt only: the first
                              round of a torchrun group (TORCHELASTIC_RESTART_COUNT 0) of a SLURM
                              job not yet requeued (SLURM_RESTART_COUNT 0), so a restart runs on
    slow_save:SECONDS         every save takes SECONDS longer (a slow parallel file system)
"""
from __future__ import annotations

import os
import signal
import time


def _armed(kind: str, step: int, rank: int) -> bool:
    fault = os.environ.get("GPTSCALE_FAULT", "")
    if not fault.startswith(kind + ":"):
        return False
    _, at_step, at_rank = fault.split(":")
    return int(at_step) == step and int(at_rank) == rank


def _first_attempt() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def in_save(step: int, rank: int) -> None:
    if _armed("die_in_save", step, rank):
        os._exit(9)
    fault = os.environ.get("GPTSCALE_FAULT", "")
    if fault.startswith("slow_save:"):
        time.sleep(float(fault.split(":")[1]))


def after_step(step: int, rank: int) -> None:
    if _armed("kill_at_step", step, rank) and _first_attempt():
        os.kill(os.getpid(), signal.SIGKILL)
