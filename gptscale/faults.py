"""Fault injection for the test suite: GPTSCALE_FAULT makes a rank fail the way a crashed or
preempted node does, at a named point. Unset (always, outside the tests), it does nothing.

    die_in_save:STEP:RANK     RANK exits (code 9) in the middle of saving STEP
    kill_at_step:STEP:RANK    RANK is SIGKILLed after STEP, in the first round of a torchrun
                              group only (TORCHELASTIC_RESTART_COUNT 0), so a restarted round runs on
"""
from __future__ import annotations

import os
import signal


def _armed(kind: str, step: int, rank: int) -> bool:
    fault = os.environ.get("GPTSCALE_FAULT", "")
    if not fault.startswith(kind + ":"):
        return False
    _, at_step, at_rank = fault.split(":")
    return int(at_step) == step and int(at_rank) == rank


def in_save(step: int, rank: int) -> None:
    if _armed("die_in_save", step, rank):
        os._exit(9)


def after_step(step: int, rank: int) -> None:
    if _armed("kill_at_step", step, rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
