"""The run-mode interface: everything the training loop may ask of a mode, and the recipe every
mode builds its engine with.

A mode (zero3, pipe, pipe_zero3; the registry in `gptscale.modes`) is one module with one
`Runtime` subclass. It builds its DeepSpeed engine for the model and the task's trainable
parameters, runs one optimizer step of `train.grad_accum` micro-batches, evaluates, exposes
this rank's parameters under canonical names, saves and restores its DeepSpeed files where
`checkpoint.layout` says its kind goes, and may add metrics or a model to sample from.
Modes never import each other; what they share lives here.
"""
from __future__ import annotations

import abc
import importlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from gptscale import modes
from gptscale.checkpoint.layout import engine_location
from gptscale.checkpoint.weights import load_canonical_params, tp_piece
from gptscale.config import RunConfig
from gptscale.convert.tp import canonical_layout, merge_tensor
from gptscale.ds_import import guard_engine_loads
from gptscale.modes import ModeSpec
from gptscale.parallel.layers import IGNORE_INDEX
from gptscale.parallel.lora import add_lora, is_adapter
from gptscale.parallel.primitives import comm_device
from gptscale.parallel.topology import Topology
from gptscale.runtime.optim import lr_at, lr_scheduler, param_groups
from gptscale.runtime.optimizer_state import load_adam_state

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), each (micro_batch, seq_len)


def runtime_class(mode: str) -> type["Runtime"]:
    """The Runtime subclass of run mode `mode` (a registered name, not `auto`), imported on first use."""
    module, _, name = modes.by_name(mode).runtime.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class RuntimeContext:
    """What a mode is built from."""

    cfg: RunConfig
    mode: ModeSpec
    topo: Topology
    ds_config: dict  # assembled for this run (a mode may add DeepSpeed-only settings before building)
    deepspeed: Any  # the imported deepspeed module (gptscale.ds_import)
    trains: Callable[[str], bool]  # the task's choice: does the parameter of this canonical name train?
    init_from: str | None = None  # canonical weights to start from (None when resuming: the checkpoint has them)
    # The task's loss normalisation: True divides the summed loss by the labelled tokens of the
    # whole optimizer step (every micro-batch, every DP rank), as SFT's loss masks need; False
    # takes each micro-batch's own mean (pretraining: every window is fully labelled).
    mean_over_step_tokens: bool = False


class NonFiniteCounter(Protocol):
    """The loop's policy for non-finite losses; a mode that can skip a micro-batch reports each
    one it skips (the loop judges every whole step itself)."""

    def nonfinite(self, step: int, what: str) -> None: ...  # raises after too many in a row


class Runtime(abc.ABC):
    """One run mode. Subclasses set the class attributes and implement the abstract methods;
    `__init__` builds the engine (`build`), normally through `initialize_engine`."""

    stage: int = 0  # this rank's pipeline stage: where its checkpoint files go

    def __init__(self, ctx: RuntimeContext):
        self.ctx, self.cfg, self.topo = ctx, ctx.cfg, ctx.topo
        self.engine = self.build()

    # -- what each mode implements -----------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def describe(cls, cfg: RunConfig, ds_config: dict) -> str:
        """A few words for the start-up message, e.g. 'ZeRO stage 3' (before the engine exists)."""

    @abc.abstractmethod
    def build(self):
        """Build the model and return its DeepSpeed engine."""

    @abc.abstractmethod
    def train_step(self, batches: Iterator[Batch], step: int, nonfinite: NonFiniteCounter) -> float:
        """One optimizer step over train.grad_accum micro-batches from `batches`; returns the
        step's mean loss over micro-batches and DP replicas, the same on every rank."""

    @abc.abstractmethod
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss over `batches` (the same held-out batches on every DP rank), on every rank."""

    @abc.abstractmethod
    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters (its TP shard, its stage) under their canonical names."""

    # -- what modes may override ------------------------------------------------------------
    def step_metrics(self) -> dict:
        """Mode-specific entries of the step's metrics record."""
        return {}

    def generation_model(self) -> nn.Module | None:
        """A whole GPT that every rank can run `generate` on together, or None: the loop then
        samples from the final checkpoint, consolidated on rank 0."""
        return None

    # -- shared by every mode ---------------------------------------------------------------
    def save_native(self, ckpt: Path, step: int) -> None:
        """DeepSpeed's files of this rank. A LoRA run's frozen base is left out: it never changes,
        and train.init_from holds it (a resume reads it from there again)."""
        folder, tag = engine_location(self.ctx.mode.checkpoint_files, ckpt, self.stage)
        self.engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step}, save_latest=False,
                                    exclude_frozen_parameters=self.cfg.lora is not None)

    def load_native(self, ckpt: Path) -> None:
        folder, tag = engine_location(self.ctx.mode.checkpoint_files, ckpt, self.stage)
        self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                    load_module_strict=self.cfg.lora is None)

    def load_resharded(self, source, step: int, adam_step: int) -> None:
        """Continue from `source`, a checkpoint of another layout read as canonical tensors: Adam's
        state (this rank's pieces), the step and the schedule. The weights came in through
        init_from when the engine was built."""
        tp = self.topo.tp_group
        _, table = canonical_layout(self.cfg.model, self.cfg.lora)
        padded = self.cfg.model.padded_vocab_size(tp.size)
        trained = {name: p for name, p in self.canonical_parameters().items() if p.requires_grad}
        load_adam_state(self.engine, trained,
                        lambda name, kind: tp_piece(source, name, table[name], tp.rank, tp.size, padded, kind),
                        adam_step)
        self.engine.global_steps = step
        self.engine.global_samples = step * self.ctx.ds_config["train_batch_size"]
        self.engine.lr_scheduler.last_epoch = step
        self.follow_schedule(step)

    def follow_schedule(self, step: int) -> None:
        """After a resume, follow this run's schedule: the checkpoint holds the rate (and the
        scheduler's base rate) its own run had, which differ when train.lr, train.steps or
        another schedule field changed since."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg.train)
        self.engine.lr_scheduler.base_lrs = [self.cfg.train.lr] * len(self.engine.lr_scheduler.base_lrs)

    def train(self) -> None:
        self.engine.train()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed has skipped (its overflow check found non-finite gradients)."""
        return self.engine.skipped_steps

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def add_adapters(self, layers: list[tuple[str, nn.Module]]) -> None:
        """LoRA adapters (finetune.method: lora) on the targeted linears of this rank's `layers`
        (canonical name prefix, module), checked against the whole model's layers. The same on
        every rank of a stage, whatever the TP size (`parallel.lora`)."""
        lora = self.cfg.lora
        if lora is None:
            return
        shapes, _ = canonical_layout(self.cfg.model)
        modules = [name.rsplit(".", 1)[0] for name in shapes if name.endswith(".weight")]
        for prefix, module in layers:
            add_lora(module, lora, self.cfg.train.seed, prefix, names=modules)

    def initialize_engine(self, model: nn.Module, canonical: dict[str, nn.Parameter], mpu=None):
        """The recipe every mode shares once it has built `model` (from the same seed on every
        rank of a stage, so replicas start equal): the starting weights of train.init_from, the
        optimizer over the task's trainable parameters with the LR schedule, then the training RNG."""
        cfg, ds = self.cfg, self.ctx.deepspeed
        if self.ctx.init_from:
            load_canonical_params(canonical, cfg.model, self.topo.tp_group, self.ctx.init_from, ds, cfg.lora)
        groups = param_groups(model, canonical, cfg.train.weight_decay, self.ctx.trains)
        engine, _, _, _ = ds.initialize(model=model, model_parameters=groups, config=self.ctx.ds_config, mpu=mpu,
                                        lr_scheduler=lr_scheduler(cfg.train))
        guard_engine_loads(engine)  # its checkpoint files are read without running code
        # Training RNG: shared within a TP group (dropout on the replicated residual stream must
        # agree), different across DP replicas.
        seed_all(cfg.train.seed + 1000 * self.topo.coords.dp + 1)
        return engine

    def gather_adapters(self) -> dict[str, torch.Tensor] | None:
        """Every LoRA adapter of the model, canonical (TP-merged, unpadded), on global rank 0
        (None elsewhere). Collective: every rank calls it. Adapters are small, so each
        (stage, TP rank)'s first DP replica sends its own to rank 0 as objects."""
        params = {name: p for name, p in self.canonical_parameters().items() if is_adapter(name)}
        with self.ctx.deepspeed.zero.GatheredParameters(list(params.values())):  # ZeRO-3: whole local shards
            local = {name: p.detach().float().cpu().clone() for name, p in params.items()}
        tp = self.topo.tp_group
        mine = (tp.rank, local if self.topo.coords.dp == 0 else {})
        everyone = [None] * self.topo.layout.world_size if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if everyone is None:
            return None
        _, table = canonical_layout(self.cfg.model, self.cfg.lora)
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        for tp_rank, tensors in everyone:
            for name, tensor in tensors.items():
                pieces.setdefault(name, {})[tp_rank] = tensor
        return {name: merge_tensor([pieces[name][r] for r in sorted(pieces[name])], split, self.cfg.model.vocab_size)
                for name, split in table.items() if name in pieces}  # in the model's order

    def step_batches(self, batches: Iterator[Batch]) -> tuple[list[Batch], torch.Tensor | None]:
        """The next optimizer step's grad_accum micro-batches, and the `num_valid_tokens` each
        micro-batch's loss is divided by: None (its own mean), or under mean_over_step_tokens
        the step's labelled tokens over all DP ranks / (grad_accum x dp). DeepSpeed divides each
        micro-batch's loss by grad_accum and averages gradients over DP, so the step's gradient
        is then exactly that of the mean over all its labelled tokens. (A micro-batch replaced
        after a non-finite loss, rare, is not in the count: that step's divisor is off by it.)"""
        micro = [next(batches) for _ in range(self.cfg.train.grad_accum)]
        if not self.ctx.mean_over_step_tokens:
            return micro, None
        labelled = torch.tensor([float(labelled_tokens(micro))], dtype=torch.float64, device=comm_device())
        dist.all_reduce(labelled, group=self.topo.get_data_parallel_group())
        share = max(labelled.item(), 1.0) / (self.cfg.train.grad_accum * self.topo.layout.dp)
        return micro, torch.tensor(share, dtype=torch.float32, device=self.engine.device)

    def eval_divisor(self, batches: list[Batch]) -> torch.Tensor | None:
        """`num_valid_tokens` for each held-out batch: None (its own mean), or under
        mean_over_step_tokens all the batches' labelled tokens / their number, so that the mean
        of the batches' losses is the mean over every labelled token (every DP rank evaluates
        the same batches)."""
        if not self.ctx.mean_over_step_tokens or not batches:
            return None
        return torch.tensor(max(labelled_tokens(batches), 1) / len(batches), dtype=torch.float32,
                            device=self.engine.device)

    def on_device(self, batch: Batch) -> Batch:
        """The loader's CPU tensors on this rank's device (DeepSpeed does not move inputs)."""
        return tuple(t.to(self.engine.device, non_blocking=True) for t in batch)


class WholeModelRuntime(Runtime):
    """A mode whose one DeepSpeedEngine runs the whole GPT (labels in, loss out) on every rank
    of a DP group (zero3). A micro-batch whose loss is not finite on some rank is skipped on
    every rank (no backward, no step) and another one is taken in its place."""

    def train_step(self, batches, step, nonfinite) -> float:
        # Host synchronisations: one per micro-batch (the agreement below, which the skip needs
        # before backward), none after backward or the step, none for the step's mean: the
        # agreement's all-reduce carries the loss summed over the ranks as well.
        loss_sums = []
        micro, num_valid_tokens = self.step_batches(batches)
        while len(loss_sums) < self.cfg.train.grad_accum:
            # A skipped micro-batch's stand-in comes from the stream (its tokens were not counted).
            input_ids, labels = self.on_device(micro.pop(0) if micro else next(batches))
            loss = self.engine(input_ids, labels=labels, num_valid_tokens=num_valid_tokens)
            nonfinite_ranks, loss_sum = agree_on_loss(loss)
            if nonfinite_ranks:
                nonfinite.nonfinite(step + 1, "micro-batches")
                continue  # skipped on every rank: no backward, no step
            self.engine.backward(loss)
            self.engine.step()
            loss_sums.append(loss_sum)
        # Every rank holds its DP replica's loss (TP ranks hold equal copies): the sum over the
        # world / its size is the mean over the DP replicas.
        return sum(loss_sums) / (len(loss_sums) * self.topo.layout.world_size)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.engine.eval()
        losses, divisor = [], self.eval_divisor(batches)
        for batch in batches:
            input_ids, labels = self.on_device(batch)
            losses.append(self.engine(input_ids, labels=labels, num_valid_tokens=divisor).detach())
        self.engine.train()
        # One host synchronisation for all the batches: their losses stay on the device until here.
        return dp_mean(torch.stack(losses).double().mean(), self.topo)

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.engine.module.named_parameters())

    def generation_model(self) -> nn.Module:
        return self.engine.module  # every rank runs it; ZeRO-3 gathers each layer for its forward


# -- helpers for modes and the loop ----------------------------------------------------------

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def labelled_tokens(batches: list[Batch]) -> int:
    """The tokens of `batches` that carry a loss (label not IGNORE_INDEX)."""
    return sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)


def dp_mean(value: float | torch.Tensor, topo: Topology) -> float:
    """The mean of `value` over the data-parallel replicas (fp64, so the order of ranks hardly matters)."""
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(comm_device())
    dist.all_reduce(t, group=topo.get_data_parallel_group())
    return t.item() / topo.layout.dp


def agree_on_loss(loss: torch.Tensor) -> tuple[int, float]:
    """(how many ranks' `loss` is not finite, the sum of the finite losses over all ranks), from
    one all-reduce and one host synchronisation: every rank learns whether to skip the
    micro-batch, and the step's mean needs no collective of its own."""
    finite = torch.isfinite(loss.detach())
    pair = torch.stack([(~finite).double(), torch.where(finite, loss.detach(), 0.0).double()])
    pair = pair.to(comm_device())
    dist.all_reduce(pair)
    nonfinite_ranks, loss_sum = pair.tolist()
    return int(nonfinite_ranks), loss_sum
