"""What one device can do: data-sheet peaks of known GPUs, or the CPU's measured matmul rate
(the denominator of MFU)."""
from __future__ import annotations

import time

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
    """(peak TFLOP/s per device, where the number comes from)."""
    if configured is not None:
        return configured, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in KNOWN_PEAKS.items():
            if key in name:
                return peak, f"{name} data sheet (bf16 dense)"
        return float("nan"), f"unknown GPU {name}: set train.peak_tflops"
    return measure_cpu_peak_tflops(), "measured fp32 matmul on this CPU"
