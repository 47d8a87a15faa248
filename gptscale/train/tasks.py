"""Tasks: what a run learns from, independent of the run mode.

A task says what the batches are, which parameters train and what it saves beside each
checkpoint; the run mode (gptscale.runtime) says how the model is split and stepped. The
training loop combines any task with any mode. Pretraining is the task today; supervised
fine-tuning (examples with loss masks) and LoRA (adapters only, base frozen) plug in here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from gptscale.config import RunConfig
from gptscale.runtime.base import Batch, Runtime
from gptscale.train.batches import redeal_train_batches, tokenizer_for, train_batches, validation_batches


class Task:
    """The interface, with pretraining's answers as the defaults where they are shared."""

    name = "task"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.tokenizer = tokenizer_for(cfg)  # None for synthetic data

    def train_batches(self, dp_rank: int, dp_size: int) -> Iterable[Batch]:
        """This DP rank's endless, resumable stream (`state_dict` / `load_state_dict`) of micro-batches."""
        raise NotImplementedError

    def validation_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        """The same held-out micro-batches at every evaluation."""
        raise NotImplementedError

    def trains(self, canonical_name: str) -> bool:
        """Does this parameter train? (Frozen ones keep their starting weights.)"""
        return True

    def redeal(self, states: list[dict], step: int, dp_rank: int, dp_size: int) -> dict:
        """Resuming at another layout: this DP rank's `train_batches` state, from the saved
        states of the old DP ranks (in their order) at training step `step`."""
        raise NotImplementedError

    def save_extras(self, ckpt: Path, runtime: Runtime) -> None:
        """Files of the task's own written into a checkpoint folder before it is committed (every rank)."""


class Pretraining(Task):
    """Next-token prediction on token windows (`data.path` shards or synthetic); every parameter trains."""

    name = "pretrain"

    def train_batches(self, dp_rank: int, dp_size: int):
        return train_batches(self.cfg, dp_rank, dp_size)

    def validation_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        return validation_batches(self.cfg, dp_rank, dp_size)

    def redeal(self, states: list[dict], step: int, dp_rank: int, dp_size: int) -> dict:
        return redeal_train_batches(self.cfg, states, step, dp_rank, dp_size)
