"""Training metrics: JSONL and TensorBoard (and Weights & Biases when asked), peak memory.

Only the writing rank (global rank 0) opens files; every rank may call `log`.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


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
