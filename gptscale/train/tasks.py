"""Tasks: what a run learns from, independent of the run mode.

A task says what the batches are, which parameters train and what it saves beside each
checkpoint; the run mode (gptscale.runtime) says how the model is split and stepped. The
training loop combines any task with any mode: pretraining (token windows), and supervised
fine-tuning (examples with loss masks), of every weight or of LoRA adapters alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch.distributed as dist

from gptscale.checkpoint.adapter import CHECKPOINT_SUBFOLDER, write_adapter
from gptscale.checkpoint.convert import check_same_tokenizer
from gptscale.config import RunConfig
from gptscale.data import sft
from gptscale.errors import ConfigError
from gptscale.parallel.lora import is_adapter
from gptscale.runtime.base import Batch, Runtime
from gptscale.train.batches import redeal_train_batches, tokenizer_for, train_batches, validation_batches


class Task:
    """The interface, with pretraining's answers as the defaults where they are shared."""

    name = "task"
    starts_from_weights = False  # a fresh run needs train.init_from

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

    # The loss of a step: the mean over its labelled tokens (True), or the mean of its
    # micro-batches' means (False: the same when every micro-batch is fully labelled).
    mean_over_step_tokens = False

    def answer_examples(self) -> list[tuple[list[int], str]]:
        """Held-out (prompt token ids, reference answer) pairs whose greedy answers the run
        scores by exact match at its end; none by default."""
        return []


class Pretraining(Task):
    """Next-token prediction on token windows (`data.path` shards or synthetic); every parameter trains."""

    name = "pretrain"

    def __init__(self, cfg: RunConfig):
        if cfg.data.path is not None and sft.is_sft_folder(cfg.data.path):
            raise ConfigError(f"data.path={cfg.data.path} holds fine-tuning examples ('gptscale data prepare-sft'); "
                              f"fine-tune with 'gptscale finetune', or pretrain on a 'gptscale data prepare' folder")
        if cfg.lora is not None:
            raise ConfigError("finetune.method=lora is for 'gptscale finetune'; pretraining trains every weight "
                              "(set finetune.method=full or drop the finetune section)")
        super().__init__(cfg)

    def train_batches(self, dp_rank: int, dp_size: int):
        return train_batches(self.cfg, dp_rank, dp_size)

    def validation_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        return validation_batches(self.cfg, dp_rank, dp_size)

    def redeal(self, states: list[dict], step: int, dp_rank: int, dp_size: int) -> dict:
        return redeal_train_batches(self.cfg, states, step, dp_rank, dp_size)


class FineTuning(Task):
    """Supervised fine-tuning on prompt/response examples (`gptscale data prepare-sft`): the loss
    covers the response tokens only, averaged over the labelled tokens of the whole step. With
    finetune.method: lora only the adapters train (the base is frozen, so it has no optimizer
    state) and each checkpoint also holds them alone, in `adapter/`."""

    name = "fine-tuning"
    mean_over_step_tokens = True
    starts_from_weights = True

    def __init__(self, cfg: RunConfig):
        if cfg.data.path is None or not sft.is_sft_folder(cfg.data.path):
            raise ConfigError(f"data.path={cfg.data.path} is not a fine-tuning folder; make one from jsonl records "
                              f"with 'gptscale data prepare-sft'")
        super().__init__(cfg)
        self.lora = cfg.lora
        if cfg.train.init_from:
            check_same_tokenizer(cfg.train.init_from, self.tokenizer, cfg.data.path)
        self._splits: dict[str, sft.SFTExamples] = {}

    def _split(self, split: str) -> sft.SFTExamples:
        if split not in self._splits:  # read (and checked) once
            self._splits[split] = sft.load_sft_split(self.cfg.data.path, split)
        return self._splits[split]

    def train_batches(self, dp_rank: int, dp_size: int):
        t = self.cfg.train
        return sft.SFTBatches(self._split("train"), self.cfg.data.seq_len, self.tokenizer.pad_id, t.micro_batch,
                              t.grad_accum,
                              dp_rank, dp_size, self.cfg.data.seed)

    def validation_batches(self, dp_rank: int, dp_size: int) -> list[Batch]:
        return sft.validation_batches_sft(self._split("val"), self.cfg.data.seq_len, self.tokenizer.pad_id,
                                          self.cfg.train.micro_batch, self.cfg.train.eval_batches)

    def trains(self, canonical_name: str) -> bool:
        return is_adapter(canonical_name) if self.lora is not None else True

    def redeal(self, states: list[dict], step: int, dp_rank: int, dp_size: int) -> dict:
        return sft.redeal_sft_state(states, step)

    def save_extras(self, ckpt: Path, runtime: Runtime) -> None:
        if self.lora is None:
            return
        adapters = runtime.gather_adapters()
        if dist.get_rank() == 0:
            write_adapter(ckpt / CHECKPOINT_SUBFOLDER, adapters, self.cfg.model, self.lora, self.cfg.train.init_from,
                          runtime.engine.global_steps)

    def answer_examples(self) -> list[tuple[list[int], str]]:
        n = self.cfg.finetune.eval_answers
        return sft.answer_examples(self._split("val"), n) if n else []
