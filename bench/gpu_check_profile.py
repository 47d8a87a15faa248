"""torch.profiler summaries for bench/gpu_check.py: GPU-busy fraction and host syncs per step.

Also an entry point, because the trainer has no profiler hook: run as
    python bench/gpu_check_profile.py OUT.json FIRST_STEP STEPS -- train --set ...
it wraps WholeModelRuntime.train_step (zero3's step) so that the profiler covers loop
iterations FIRST_STEP .. FIRST_STEP+STEPS-1 whole (step, grad norm, logging, stop flag),
writes the summary to OUT.json, then `gptscale train` goes on as usual.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def activities() -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Time covered by at least one interval: kernels on several streams may overlap."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(prof, wall_s: float, steps: int) -> dict:
    """Read the Chrome trace (a stable format across torch versions, unlike the event API)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") == "kernel"]
    busy_us = _union_us(kernels)
    on_gpu = torch.cuda.is_available()  # on the CPU there are no kernels: busy is n/a, not 0%
    names = [e.get("name", "") for e in events]
    per_step = {call: names.count(call) / steps for call in SYNC_CALLS}
    per_step["memcpy_DtoH"] = sum(1 for e in events if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")) / steps
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    kernel_us: dict[str, float] = {}  # which attention kernel ran, and where GPU time goes
    for e in events:
        if e.get("cat") == "kernel":
            kernel_us[e.get("name", "")] = kernel_us.get(e.get("name", ""), 0.0) + e.get("dur", 0)
    top_kernels = sorted(kernel_us.items(), key=lambda item: -item[1])[:12]
    return {"steps": steps, "wall_s": wall_s, "gpu_busy_fraction": busy_us / 1e6 / wall_s if wall_s and on_gpu else None,
            "kernel_count": len(kernels), "per_step": per_step, "top_kernels_us": top_kernels,
            "top_self_cpu_ops": top.splitlines()}


def profile_steps(step_fn, steps: int) -> dict:
    """Profile `steps` calls of step_fn, synchronised at both ends so wall covers the GPU work."""
    sync()
    with profile(activities=activities()) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        sync()
        wall = time.perf_counter() - start
    return summarize(prof, wall, steps)


def short(summary: dict) -> str:
    """One table cell: busy fraction and syncs per step."""
    busy = summary["gpu_busy_fraction"]
    counts = ", ".join(f"{name.replace('cuda', '').replace('Synchronize', 'Sync')} {count:g}"
                       for name, count in summary["per_step"].items())
    busy_text = f"GPU busy {busy:.0%}" if busy is not None else "GPU busy n/a (no GPU)"
    return f"{busy_text}; per step: {counts}"


def install_train_hook(out_json: str, first: int, steps: int) -> None:
    from gptscale.runtime.base import WholeModelRuntime

    original = WholeModelRuntime.train_step
    state: dict = {}

    def train_step(self, batches, step, nonfinite):
        if step == first:
            sync()
            state["prof"] = profile(activities=activities())
            state["prof"].__enter__()
            state["start"] = time.perf_counter()
        elif step == first + steps and "prof" in state:
            sync()
            wall = time.perf_counter() - state["start"]
            state["prof"].__exit__(None, None, None)
            Path(out_json).write_text(json.dumps(summarize(state.pop("prof"), wall, steps), indent=1))
        return original(self, batches, step, nonfinite)

    WholeModelRuntime.train_step = train_step


def main() -> int:
    out_json, first, steps, dashes, *cli_args = sys.argv[1:]
    assert dashes == "--", "usage: gpu_check_profile.py OUT.json FIRST_STEP STEPS -- train --set ..."
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gptscale
    install_train_hook(out_json, int(first), int(steps))
    from gptscale.cli import run

    sys.argv = ["gptscale", *cli_args]
    return run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
