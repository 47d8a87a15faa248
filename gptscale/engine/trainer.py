"""`gptscale train`: TP x ZeRO-3 DP pretraining with DeepSpeed.

Works under any launcher (see launch_env). The model is built inside
`deepspeed.zero.Init`, so no rank ever holds the whole model, and the topology is handed
to DeepSpeed as its `mpu`, so ZeRO partitions over the data-parallel group only.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from gptscale.atomic import write_text_atomic
from gptscale.config import RunConfig
from gptscale.engine import checkpoint
from gptscale.engine.data import tokenizer_for, train_batches, validation_batches
from gptscale.engine.ds_config import assemble, load_template
from gptscale.engine.ds_env import import_deepspeed, on_gpu
from gptscale.engine.launch_env import comm_device, init_distributed
from gptscale.engine.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from gptscale.engine.schedule import lr_factor
from gptscale.model.counting import flops_per_token
from gptscale.model.generate import generate
from gptscale.model.gpt import GPT
from gptscale.parallel.topology import Topology


@dataclass
class TrainResult:
    steps_done: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean training loss
    val_losses: dict[int, float] = field(default_factory=dict)
    stopped_by_signal: bool = False
    sample: str | None = None


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) set a flag; ranks agree on it at each step end."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.flag else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and positions are not decayed."""
    decay, rest = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "pos_embed" not in name else rest).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _dp_mean(value: float, topo: Topology) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=topo.get_data_parallel_group())
    return t.item() / topo.layout.dp


def _quiet_libraries() -> None:
    """DeepSpeed logs every step at INFO and torch warns about deprecated collectives that
    DeepSpeed calls; neither is actionable for a user of gptscale."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str = "auto"):
        self.cfg = cfg
        self.stop = StopRequest()  # first: a preemption notice during start-up must not be lost
        load_template(cfg)  # a wrong DeepSpeed template fails before any rank waits for another
        self.deepspeed = import_deepspeed()
        _quiet_libraries()
        launch = init_distributed()
        self.deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.topo = Topology.from_env(cfg.parallel)
        self.rank = dist.get_rank()
        self.is_writer = self.rank == 0
        self.run_dir = Path(cfg.train.out_dir)
        self.layout = {"mode": self.mode, "tp": self.topo.layout.tp, "pp": self.topo.layout.pp,
                       "dp": self.topo.layout.dp}
        self.resume_from = checkpoint.find_resume(self.run_dir, resume)
        self.tokenizer = tokenizer_for(cfg)
        self.ds_config = assemble(cfg, self.topo.layout.dp, on_gpu())
        if self.is_writer:
            l = self.topo.layout
            print(f"gptscale train: {launch.describe()}", flush=True)
            print(f"gptscale train: {l.world_size} rank(s) = tp {l.tp} x pp {l.pp} x dp {l.dp}, "
                  f"{self.describe_mode()}, {cfg.train.precision}, run dir {self.run_dir}", flush=True)
        self._build_engine()

    mode = "zero3"
    checkpoint_subdir: str | None = None  # where this rank's DeepSpeed files go inside a checkpoint

    def describe_mode(self) -> str:
        return "ZeRO stage 3"

    def _build_engine(self) -> None:
        cfg, ds = self.cfg, self.deepspeed
        # Same seed on every rank while building: parameters are identical before ZeRO partitions them.
        _seed_all(cfg.train.seed)
        with ds.zero.Init(config_dict_or_path=self.ds_config, mpu=self.topo,
                          data_parallel_group=self.topo.get_data_parallel_group()):
            model = GPT(cfg.model, self.topo.tp_group)
        if cfg.train.init_from:
            from gptscale.engine.weights import load_canonical_into

            load_canonical_into(model, cfg.train.init_from, ds)
        self.engine, _, _, _ = ds.initialize(
            model=model, model_parameters=_param_groups(model, cfg.train.weight_decay), config=self.ds_config,
            mpu=self.topo, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train)))
        # Training RNG: shared within a TP group (dropout on the replicated residual stream must
        # agree), different across DP replicas.
        _seed_all(cfg.train.seed + 1000 * self.topo.coords.dp + 1)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        batches = train_batches(cfg, self.topo.coords.dp, self.topo.layout.dp)
        held_out = validation_batches(cfg, self.topo.coords.dp, self.topo.layout.dp)
        step = 0
        if self.resume_from is not None:
            rank_state = checkpoint.load(self.engine, self.resume_from, cfg, self.layout, self.checkpoint_subdir)
            step = int(self.resume_from.name.removeprefix("step"))
            if rank_state is not None:
                batches.load_state_dict(rank_state["data"])
                _set_rng_state(rank_state["rng"])
            if self.is_writer:
                print(f"resumed from {self.resume_from} at step {step}", flush=True)
        elif self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_writer:
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_text_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))

        peak, peak_source = device_peak_tflops(t.peak_tflops)
        flops_token = flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_step = t.micro_batch * t.grad_accum * self.topo.layout.dp * cfg.data.seq_len
        metrics = MetricsLogger(self.run_dir, self.is_writer, t.tensorboard, t.wandb, cfg.to_dict())
        if self.is_writer:
            print(f"{tokens_per_step:,} tokens/step, {flops_token / 1e6:.2f} MFLOP/token; MFU against "
                  f"{peak:.3f} TFLOP/s per device ({peak_source})", flush=True)
        result = TrainResult(steps_done=step)
        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_writer and t.progress), file=sys.stderr)
        iterator = iter(batches)
        self.nonfinite_streak, self.nonfinite_total = 0, 0
        if step == 0 and t.eval_every:  # the baseline the validation curve falls from
            result.val_losses[0] = self.evaluate(held_out)
            metrics.log({"step": 0, "val_loss": result.val_losses[0], "val_ppl": math.exp(min(result.val_losses[0], 50))})
            if self.is_writer:
                bar.write(f"step 0: val loss {result.val_losses[0]:.4f} (before training)")
        self.engine.train()
        while step < t.steps:
            start = time.perf_counter()
            loss_value = self.train_step(iterator, step)
            step += 1
            elapsed = time.perf_counter() - start
            result.losses[step] = loss_value
            tokens_per_s = tokens_per_step / elapsed
            tflops = flops_token * tokens_per_s / self.topo.layout.world_size / 1e12
            if step % t.log_every == 0 or step == t.steps:
                grad_norm = self.engine.get_global_grad_norm()
                metrics.log({"step": step, "loss": loss_value, "lr": self.engine.get_lr()[0],
                             "grad_norm": float(grad_norm) if grad_norm is not None else None,
                             "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
                             "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
                             "peak_mem_gb": peak_memory_gb(), "nonfinite_skipped": self.nonfinite_total,
                             "step_time_s": elapsed, **self.step_metrics()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                val = self.evaluate(held_out)
                result.val_losses[step] = val
                metrics.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
                if self.is_writer:
                    bar.write(f"step {step}: val loss {val:.4f} (ppl {math.exp(min(val, 50)):.1f})")
            signalled = self.stop.agreed()
            if (t.save_every and step % t.save_every == 0) or step == t.steps or signalled:
                self.save(step, batches)
            if signalled:
                result.stopped_by_signal = True
                if self.is_writer:
                    bar.write(f"stop signal: saved step {step} and exiting")
                break
        bar.close()
        result.steps_done = step
        if not result.stopped_by_signal and t.sample_tokens and self.tokenizer is not None:
            result.sample = self.sample()
            if self.is_writer:
                print(f"sample ({t.sample_tokens} tokens after {t.sample_prompt!r}):\n{result.sample}", flush=True)
        metrics.close()
        return result

    def train_step(self, iterator, step: int) -> float:
        """One optimizer step over grad_accum micro-batches; returns the global mean loss."""
        losses = []
        while len(losses) < self.cfg.train.grad_accum:
            input_ids, labels = self._on_device(next(iterator))
            loss = self.engine(input_ids, labels=labels)
            if not self._finite_everywhere(loss):
                self._count_nonfinite(step, "micro-batches")
                continue  # skipped on every rank: no backward, no step
            self.nonfinite_streak = 0
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
        return _dp_mean(sum(losses) / len(losses), self.topo)

    def _count_applied_step(self, loss: float, step: int) -> float:
        """Pipeline modes apply a whole step before its loss is known: a non-finite one is
        counted (and max_nonfinite in a row stop the run) but cannot be skipped."""
        if math.isfinite(loss):
            self.nonfinite_streak = 0
        else:
            self._count_nonfinite(step, "steps")
        return loss

    def _count_nonfinite(self, step: int, what: str) -> None:
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive {what} had a non-finite loss at step {step}; "
                f"lower train.lr, raise train.warmup_steps or check the data (last good "
                f"checkpoint: {checkpoint.complete_checkpoints(self.run_dir / 'checkpoints')[-1:]})")

    def step_metrics(self) -> dict:
        """Mode-specific entries of the step's metrics record."""
        return {}

    def _on_device(self, batch):
        """The loader's CPU tensors on this rank's device (DeepSpeed does not move inputs)."""
        return tuple(t.to(self.engine.device, non_blocking=True) for t in batch)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=comm_device())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    @torch.no_grad()
    def evaluate(self, held_out) -> float:
        self.engine.eval()
        losses = []
        for batch in held_out:
            x, y = self._on_device(batch)
            losses.append(self.engine(x, labels=y).item())
        self.engine.train()
        return _dp_mean(sum(losses) / len(losses), self.topo)

    def save(self, step: int, batches) -> Path:
        state = {"data": batches.state_dict(), "rng": _rng_state()}
        path = checkpoint.save(self.engine, self.run_dir, step, self.cfg, self.layout, state,
                               self.cfg.train.keep_checkpoints, self.checkpoint_subdir)
        if self.is_writer and os.environ.get("GPTSCALE_QUIET_SAVE") is None:
            tqdm.write(f"checkpoint: {path}", file=sys.stderr)
        return path

    def sample(self) -> str:
        t = self.cfg.train
        prompt = torch.tensor([self.tokenizer.encode(t.sample_prompt)], device=self.engine.device)
        g = torch.Generator(device=self.engine.device).manual_seed(t.seed)
        out = generate(self.engine.module, prompt, t.sample_tokens, temperature=0.8, top_k=50, generator=g,
                       stop_token=self.tokenizer.eos_id)
        return self.tokenizer.decode(out[0].tolist())


def train(cfg: RunConfig, resume: str = "auto") -> TrainResult:
    mode = cfg.parallel.resolved_mode
    if mode == "pipe":
        from gptscale.engine.pipe_trainer import PipelineTrainer as trainer_class
    elif mode == "pipe_zero3":
        from gptscale.engine.pipe_zero3 import PipeZero3Trainer as trainer_class
    else:
        trainer_class = Trainer
    return trainer_class(cfg, resume).run()
