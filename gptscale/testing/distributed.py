"""Run a function on N local CPU ranks (gloo) and collect each rank's result.

Used by the test suite and by `gptscale selftest`. Unlike DeepSpeed's own harness it runs
multi-rank work on CPU. It never hangs its caller: a rank that raises fails the whole run
with that rank's traceback, a rank that dies without a word is reported with its exit code,
and the run is killed after `timeout` seconds.

`fn(*args)` runs after `torch.distributed` is initialised (world group over gloo); it must
be importable by name (a module-level function), because ranks are spawned, not forked.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable


class RankFailure(RuntimeError):
    """One or more ranks failed, died or timed out; the message carries their tracebacks."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run fn(*args) on `world_size` spawned ranks; return [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    results: queue_module.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gptscale-ranks-") as tmp:
        store = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, name=f"gptscale-rank{rank}",  # not daemonic: ranks start loader workers
                             args=(fn, rank, world_size, store, results, args, env or {}, timeout))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, timeout)
        finally:
            _stop(procs)


def _collect(procs: list, results: queue_module.Queue, timeout: float) -> list[Any]:
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcome) < len(procs):
        try:
            rank, status, payload = results.get(timeout=0.2)
            outcome[rank] = (status, payload)
        except queue_module.Empty:
            pass
        failed = any(status == "error" for status, _ in outcome.values())
        if failed or any(p.exitcode is not None for r, p in enumerate(procs) if r not in outcome):
            # Give peers a moment to report: the first failure is often a consequence of
            # another rank's (a peer that died resets the connection), and both help.
            _drain(results, outcome, seconds=1.0)
            if _note_silent_deaths(procs, outcome) or failed:
                break
        if time.monotonic() > deadline:
            missing = [r for r in range(len(procs)) if r not in outcome]
            raise RankFailure(f"timed out after {timeout:.0f}s waiting for ranks {missing} "
                              f"(reported: {sorted(outcome)}); a collective may be waiting on a rank "
                              f"that never joins it")
    errors = {r: payload for r, (status, payload) in sorted(outcome.items()) if status == "error"}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        raise RankFailure(f"{len(errors)} rank(s) failed:\n{text}")
    return [outcome[r][1] for r in range(len(procs))]


def _note_silent_deaths(procs: list, outcome: dict) -> bool:
    """Record ranks that exited without a message; True if there were any."""
    silent = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode is not None]
    for r in silent:
        outcome[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} without reporting")
    return bool(silent)


def _drain(results: queue_module.Queue, outcome: dict, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            rank, status, payload = results.get(timeout=0.05)
            outcome.setdefault(rank, (status, payload))
        except queue_module.Empty:
            pass


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _rank_main(fn, rank, world_size, store, results, args, env, timeout) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "OMP_NUM_THREADS": "1", **env})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share few cores: oversubscription only slows them
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        try:
            results.put((rank, "ok", fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything, including SystemExit, must be reported
        results.put((rank, "error", traceback.format_exc()))
