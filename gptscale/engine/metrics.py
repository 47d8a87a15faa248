"""Training metrics: JSONL and TensorBoard (and Weights & Biases when asked), throughput, MFU.

Only the writing rank (global rank 0) opens files; every rank may call `log`.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets.
KNOWN_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def measure_cpu_peak_tflops(seconds: float = 0.5, n: int = 1024) -> float:
    """fp32 matmul TFLOP/s this process achieves on the CPU threads it has (the MFU denominator on CPU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e12


def device_peak_tflops(configured: float | None) -> tuple[float, str]:
    if configured is not None:
        return configured, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in KNOWN_PEAKS.items():
            if key in name:
                return peak, f"{name} data sheet (bf16 dense)"
        return float("nan"), f"unknown GPU {name}: set train.peak_tflops"
    return measure_cpu_peak_tflops(), "measured fp32 matmul on this CPU"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, wandb: bool, config: dict):
        self.enabled = enabled
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                print("warning: train.wandb=true but wandb is not installed; pip install wandb", file=sys.stderr)
            else:
                self._wandb = wandb_module.init(project="gptscale", dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
