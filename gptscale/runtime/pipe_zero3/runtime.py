"""`parallel.mode: pipe_zero3`: pipeline stages whose parameters, gradients and optimizer
states are ZeRO-3-partitioned over the stage's data-parallel group (what DeepSpeed's
PipelineEngine refuses).

Each stage is a plain module (`model.stages.StageModule`: its slice of the GPT's stage
layers, cut where `stage_bounds` says) wrapped in its own ZeRO-3 `DeepSpeedEngine` over its
DP group; TP works inside it as usual. gptscale's own 1F1B schedule moves activations
forward and their gradients back with point-to-point send/receive. The last stage
back-propagates its loss through `engine.backward`; the others back-propagate a surrogate
scalar sum(output * received gradient), whose gradient with respect to the output is
exactly the received one, so gathering, reduce-scattering and partitioning stay
DeepSpeed's. ZeRO-3's own consistency checks are scoped to the stage's DP group (ds_internals).
Between stages each TP rank sends 1/tp of the activation and the receiving TP group
all-gathers it (p2p.py).

GPT-2's tied embedding: the first stage's token embedding and the last stage's output
projection are two copies of one matrix, each in its own stage's engine. They start equal
(the last stage's copy is the first stage's, sent once at build) and stay equal bitwise:
before the boundary step the two stages' ranks with the same TP and DP coordinates swap
their local fp32 gradient partitions of it (ZeRO-3 partitions one parameter alike over
DP groups of one size) and each adds the other's, so both hold the dense model's gradient
(embedding use + head use) and take the identical step; the global gradient norm counts it
once (ds_internals 4).

`parallel.pipe_zero3_gather`: `micro_batch` re-gathers each layer's parameters for every
micro-batch's forward and backward (least memory, 2m gathers per step); `step` gathers the
stage's parameters once per step and keeps them for all micro-batches (memory of a whole
stage's parameters, ZeRO-2-like within the step; one gather per step).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from gptscale.model.loss import normalise_loss_sum
from gptscale.errors import ConfigError
from gptscale.model.compile import compile_blocks
from gptscale.model.stages import StageModule, chunk_ranges, describe_stages, stage_bounds, stage_layers, tied_stages
from gptscale.parallel.primitives import comm_device
from gptscale.runtime.base import Runtime, seed_all
from gptscale.runtime.pipe_zero3.ds_internals import (accumulate_from_zero, count_once_in_grad_norm, end_backward,
                                                      keep_gathered, scope_checks_to)
from gptscale.runtime.pipe_zero3.p2p import (P2P, TIED_TAG, activation_shape, activation_tag, gradient_tag,
                                             swap_with)
from gptscale.runtime.pipe_zero3.schedule import stage_ops
from gptscale.runtime.stage_idle import BusyTimer, idle_fractions_per_stage
from gptscale.scaling.bubble import theoretical_idle_fraction

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PipeZero3Runtime(Runtime):
    @classmethod
    def describe(cls, cfg, ds_config) -> str:
        v = cfg.parallel.virtual_stages
        schedule = f"interleaved 1F1B over {v} chunks per stage" if v > 1 else "1F1B"
        return (f"pipe_zero3: {cfg.parallel.pp} stages, each ZeRO stage 3 over its DP group ({schedule}, "
                f"{cfg.train.grad_accum} micro-batches, parameters gathered per {cfg.parallel.pipe_zero3_gather})")

    def build(self):
        cfg, ds, topo = self.cfg, self.ctx.deepspeed, self.topo
        scope_checks_to(topo.get_data_parallel_group())
        self.stage, self.stages = topo.coords.pp, topo.layout.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == self.stages - 1
        self.virtual = v = cfg.parallel.virtual_stages
        ranges = chunk_ranges(cfg.model, self.stages, cfg.parallel.pipe_partition, v)
        layers = stage_layers(cfg.model, topo.tp_group)
        if dist.get_rank() == 0:
            bounds = stage_bounds(cfg.model, self.stages * v, cfg.parallel.pipe_partition)
            cut = describe_stages(layers, bounds)
            if v > 1:  # the pieces are model chunks: stage s holds chunks s, pp + s, ...
                cut = f"{v} chunks per stage, stage s runs chunks s, {self.stages} + s, ...: " + describe_stages(
                    layers, bounds, piece="chunk")
            print(f"gptscale train: {cut}", flush=True)
        if v > 1:
            self._count_chunk_backwards(v)
        mpu = topo.stage_mpu()
        # Each stage saves under its own tag (stage00, stage01, ...) by design.
        self.ctx.ds_config.setdefault("checkpoint", {})["tag_validation"] = "Ignore"
        seed_all(cfg.train.seed + self.stage)
        with ds.zero.Init(config_dict_or_path=self.ctx.ds_config, mpu=mpu,
                          data_parallel_group=topo.get_data_parallel_group()):
            self.module = StageModule(layers, ranges[self.stage])
        compile_blocks(self.module, cfg.model)
        # key -> (the other stage's rank with this rank's TP and DP coordinates, this stage's copy)
        self.tied = {key: (topo.pipe_peer(next(s for s in stages if s != self.stage)), self.module.tied_modules()[key])
                     for key, stages in tied_stages(layers, ranges).items() if self.stage in stages and len(stages) > 1}
        self._start_tied_equal()
        self.add_adapters([(spec.prefix, layer) for spec, layer in zip(self.module.specs, self.module.layers)])
        engine = self.initialize_engine(self.module, self.module.canonical_parameters(), mpu=mpu)
        second_copies = [p for key in sorted(self.tied) if self.tied[key][0] < topo.rank  # the peer is earlier
                         for p in _by_name(self.tied[key][1])]
        if second_copies:
            count_once_in_grad_norm(engine.optimizer, second_copies)
        shape, split_over_tp = activation_shape(cfg, topo.layout.tp)
        self.p2p = P2P(topo, shape, _DTYPES[cfg.train.precision], split_over_tp)
        self.timer = BusyTimer()
        self.step_timing = (0.0, 0.0)
        return engine

    def _count_chunk_backwards(self, v: int) -> None:
        """Interleaved: every chunk's backward is one of DeepSpeed's micro-steps (m·v per step;
        the loss is divided by m in `_backward`); the gradient partitions accumulate from zero."""
        ds, t = self.ctx.ds_config, self.cfg.train
        zero = ds.get("zero_optimization", {})
        for offload in ("offload_optimizer", "offload_param"):
            if (zero.get(offload) or {}).get("device", "none") != "none":
                raise ConfigError(f"parallel.virtual_stages={v} is not supported with {offload} in the DeepSpeed "
                                  f"template (untested); use train.ds_config=zero3, or virtual_stages=1")
        ds["gradient_accumulation_steps"] = t.grad_accum * v
        ds["train_batch_size"] = t.micro_batch * t.grad_accum * v * self.topo.layout.dp

    def _start_tied_equal(self) -> None:
        """The later stage's copy of each tied layer := the earlier stage's (whole, within
        ZeRO-3's gather; train.init_from, if set, then loads the same weights into both)."""
        for key in sorted(self.tied):
            peer, module = self.tied[key]
            params = _by_name(module)
            sends = peer > self.topo.rank  # the earlier stage (pipe_peer ranks grow with the stage)
            # The receiver's DP rank 0 "modifies": on leaving, ZeRO-3 re-partitions what it received.
            gathered = self.ctx.deepspeed.zero.GatheredParameters(params, modifier_rank=None if sends else 0)
            with gathered, torch.no_grad():
                for param in params:
                    if sends:
                        dist.send(param.data.contiguous(), peer, tag=TIED_TAG)
                    else:
                        received = torch.empty_like(param.data)
                        dist.recv(received, peer, tag=TIED_TAG)
                        param.data.copy_(received)

    def _sum_tied_gradients(self) -> None:
        """Each copy's gradient := the sum of both copies' gradients (its local ZeRO-3 partition;
        a + b == b + a in floating point, so both copies take the identical step)."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for key in sorted(self.tied):
            peer, module = self.tied[key]
            for param in _by_name(module):
                if not param.requires_grad:
                    continue  # frozen (a LoRA run's base): both copies stay as loaded
                mine = safe_get_local_grad(param).clone()
                safe_set_local_grad(param, mine + swap_with(mine, peer, TIED_TAG))

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        return self.module.canonical_parameters()

    # -- one optimizer step: 1F1B, plain or interleaved ----------------------------------
    def train_step(self, batches, step, nonfinite) -> float:
        m, v = self.cfg.train.grad_accum, self.virtual
        inflight: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (micro, chunk) -> (input, output)
        losses: list[torch.Tensor] = []  # the last stage's, on the device until the step's end
        self.backwards_done = 0
        micro, self.num_valid_tokens = self.step_batches(batches)
        if v > 1:
            accumulate_from_zero(self.engine)
        with self._gathered_for_step():
            for op in stage_ops(self.stages, self.stage, m, v):
                if op.backward:
                    self._backward(op, inflight)
                else:
                    self._forward(op, micro[op.micro], inflight, losses)
            self.p2p.wait_sends()
        # The boundary step last, once every gradient has been passed on: its gradient norm is
        # an all-reduce over all stages, which a stage still waiting for a gradient would block.
        self._sum_tied_gradients()
        self.engine.step()
        self.step_timing = self.timer.take()
        return self._mean_from_last_stage(losses)

    def _feeds_loss(self, chunk: int) -> bool:
        return self.is_last and chunk == self.virtual - 1

    def _loss(self, x, chunk: int, labels, num_valid_tokens) -> torch.Tensor:
        """The model's last chunk on x: its head computes the loss fused with the projection
        (never the logits), normalised as `lm_loss` normalises."""
        return normalise_loss_sum(self.engine(x, chunk=chunk, labels=labels), labels, num_valid_tokens)

    def _chunk_input(self, input_ids, chunk: int) -> torch.Tensor:
        """The token ids for the model's first chunk, else the previous chunk's output."""
        if self.is_first and chunk == 0:
            return input_ids
        return self.p2p.recv(self.p2p.prev, activation_tag(chunk))

    def _send_output(self, out, chunk: int) -> None:
        """To the next chunk: the next stage's, or from the last stage stage 0's next one."""
        self.p2p.send(out, self.p2p.next, activation_tag(chunk + (1 if self.is_last else 0)))

    def _forward(self, op, batch, inflight: dict, losses: list[torch.Tensor]) -> None:
        input_ids, labels = self.on_device(batch)
        x = self._chunk_input(input_ids, op.chunk)
        started = self.timer.begin()  # waiting for the input was idle time
        if x is not input_ids:
            x.requires_grad_()
        if self._feeds_loss(op.chunk):
            out = self._loss(x, op.chunk, labels, self.num_valid_tokens)
            losses.append(out.detach())  # no host synchronisation before the backward is queued
        else:
            out = self.engine(x, chunk=op.chunk)
        self.timer.end(started)
        inflight[(op.micro, op.chunk)] = (x, out)
        if not self._feeds_loss(op.chunk):
            self._send_output(out, op.chunk)

    def _backward(self, op, inflight: dict) -> None:
        x, out = inflight.pop((op.micro, op.chunk))
        if self._feeds_loss(op.chunk):
            started = self.timer.begin()
            # The step's loss is the mean over its m micro-batches (DeepSpeed would divide by its
            # accumulation steps, which count m·v backwards when interleaved).
            self.engine.backward(out / self.cfg.train.grad_accum, scale_wrt_gas=False)
        else:
            grad_out = self.p2p.recv(self.p2p.next, gradient_tag(op.chunk))
            started = self.timer.begin()
            # d(sum(out * g))/d(out) = g, which already carries the last stage's 1/grad_accum.
            self.engine.backward((out * grad_out).sum(), scale_wrt_gas=False)
        end_backward(self.engine)  # the next backward may come before the next forward
        self.timer.end(started)
        self.backwards_done += 1
        if self.backwards_done < self.cfg.train.grad_accum * self.virtual:
            self.engine.step()  # not the boundary: DeepSpeed only counts the micro-step
        if not (self.is_first and op.chunk == 0):  # to the previous chunk
            self.p2p.send(x.grad, self.p2p.prev, gradient_tag(op.chunk - (1 if self.is_first else 0)))

    def step_metrics(self) -> dict:
        p, m = self.stages, self.cfg.train.grad_accum
        return {"pipe_idle_fraction": idle_fractions_per_stage(*self.step_timing, self.topo),
                "pipe_idle_theory": theoretical_idle_fraction(p, m, self.virtual)}

    def _gathered_for_step(self):
        if self.cfg.parallel.pipe_zero3_gather == "step":
            return keep_gathered(list(self.engine.module.parameters()), self.ctx.deepspeed)
        return contextlib.nullcontext()

    def _mean_from_last_stage(self, losses: list[torch.Tensor]) -> float:
        """The mean loss over micro-batches and DP replicas, from the last stage to every rank
        (the one host synchronisation for the step's losses)."""
        value = torch.zeros(1, dtype=torch.float64, device=comm_device())
        if losses:
            value += torch.stack(losses).double().mean().to(value.device)
        if self.is_last:
            dist.all_reduce(value, group=self.topo.get_data_parallel_group())
            value /= self.topo.layout.dp
        dist.broadcast(value, src=self.topo.pipe_peer(self.stages - 1), group=self.topo.get_pipe_parallel_group())
        return value.item()

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.engine.eval()
        losses, divisor = [], self.eval_divisor(batches)
        for batch in batches:  # fill and drain per batch and chunk: evaluation is small
            input_ids, labels = self.on_device(batch)
            for chunk in range(self.virtual):
                x = self._chunk_input(input_ids, chunk)
                if self._feeds_loss(chunk):
                    losses.append(self._loss(x, chunk, labels, divisor).detach())
                else:
                    self._send_output(self.engine(x, chunk=chunk), chunk)
        self.p2p.wait_sends()
        self.engine.train()
        self.timer.take()  # evaluation is not part of a training step's bubble
        return self._mean_from_last_stage(losses)


def _by_name(module: nn.Module) -> list[nn.Parameter]:
    """`module`'s parameters in the order of their names (the same on every stage)."""
    return [param for _, param in sorted(module.named_parameters(), key=lambda item: item[0])]
