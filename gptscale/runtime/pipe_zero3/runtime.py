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
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn

from gptscale.model.loss import lm_loss
from gptscale.model.stages import StageModule, describe_stages, stage_bounds, stage_layers, tied_stages
from gptscale.parallel.primitives import comm_device
from gptscale.runtime.base import Runtime, seed_all
from gptscale.runtime.pipe_zero3.ds_internals import (count_once_in_grad_norm, end_backward, keep_gathered,
                                                      scope_checks_to)
from gptscale.runtime.pipe_zero3.p2p import P2P, TIED_TAG, activation_shape, swap_with

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PipeZero3Runtime(Runtime):
    @classmethod
    def describe(cls, cfg, ds_config) -> str:
        return (f"pipe_zero3: {cfg.parallel.pp} stages, each ZeRO stage 3 over its DP group (1F1B, "
                f"{cfg.train.grad_accum} micro-batches, parameters gathered per {cfg.parallel.pipe_zero3_gather})")

    def build(self):
        cfg, ds, topo = self.cfg, self.ctx.deepspeed, self.topo
        scope_checks_to(topo.get_data_parallel_group())
        self.stage, self.stages = topo.coords.pp, topo.layout.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == self.stages - 1
        bounds = stage_bounds(cfg.model, self.stages, cfg.parallel.pipe_partition)
        layers = stage_layers(cfg.model, topo.tp_group)
        if dist.get_rank() == 0:
            print(f"gptscale train: {describe_stages(layers, bounds)}", flush=True)
        mpu = topo.stage_mpu()
        # Each stage saves under its own tag (stage00, stage01, ...) by design.
        self.ctx.ds_config.setdefault("checkpoint", {})["tag_validation"] = "Ignore"
        seed_all(cfg.train.seed + self.stage)
        with ds.zero.Init(config_dict_or_path=self.ctx.ds_config, mpu=mpu,
                          data_parallel_group=topo.get_data_parallel_group()):
            self.module = StageModule(layers, bounds[self.stage], bounds[self.stage + 1])
        # key -> (the other stage's rank with this rank's TP and DP coordinates, this stage's copy)
        self.tied = {key: (topo.pipe_peer(next(s for s in stages if s != self.stage)), self.module.tied_modules()[key])
                     for key, stages in tied_stages(layers, bounds).items() if self.stage in stages and len(stages) > 1}
        self._start_tied_equal()
        self.add_adapters([(spec.prefix, layer) for spec, layer in zip(self.module.specs, self.module.layers)])
        engine = self.initialize_engine(self.module, self.module.canonical_parameters(), mpu=mpu)
        second_copies = [p for key in sorted(self.tied) if self.tied[key][0] < topo.rank  # the peer is earlier
                         for p in _by_name(self.tied[key][1])]
        if second_copies:
            count_once_in_grad_norm(engine.optimizer, second_copies)
        shape, split_over_tp = activation_shape(cfg, topo.layout.tp)
        self.p2p = P2P(topo, shape, _DTYPES[cfg.train.precision], split_over_tp)
        return engine

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

    # -- one optimizer step: 1F1B ----------------------------------------------------------
    def train_step(self, batches, step, nonfinite) -> float:
        m = self.cfg.train.grad_accum
        warmup = min(self.stages - self.stage - 1, m)
        inflight: deque = deque()
        losses: list[float] = []
        self.backwards_done = 0
        micro, self.num_valid_tokens = self.step_batches(batches)
        batches = iter(micro)
        with self._gathered_for_step():
            x = None
            for _ in range(warmup):
                x = self._forward(next(batches), inflight, losses, self._recv_forward())
                self._send(x, self.p2p.next)
            if m > warmup:
                x = self._recv_forward()
            for i in range(m - warmup):
                out = self._forward(next(batches), inflight, losses, x)
                grad_out = self._exchange(out, self.p2p.next, self.p2p.next)  # send activation, receive its gradient
                x_grad = self._backward(inflight, grad_out)
                last = i == m - warmup - 1
                x = self._exchange(x_grad, self.p2p.prev, None if last else self.p2p.prev)
            for _ in range(warmup):
                x_grad = self._backward(inflight, self._exchange(None, None, self.p2p.next))
                self._send(x_grad, self.p2p.prev)
        # The boundary step last, once every gradient has been passed on: its gradient norm is
        # an all-reduce over all stages, which a stage still waiting for a gradient would block.
        self._sum_tied_gradients()
        self.engine.step()
        return self._mean_from_last_stage(losses)

    def _recv_forward(self) -> torch.Tensor | None:
        return self._exchange(None, None, self.p2p.prev)

    def _send(self, tensor, peer) -> None:
        self._exchange(tensor, peer, None)

    def _exchange(self, tensor, send_to, recv_from):
        send = [(tensor.detach(), send_to)] if tensor is not None and send_to is not None else []
        received = self.p2p.exchange(send, [recv_from] if recv_from is not None else [])
        return received[0] if received else None

    def _forward(self, batch, inflight: deque, losses: list[float], received):
        input_ids, labels = self.on_device(batch)
        x = input_ids if self.is_first else received.requires_grad_()
        out = self.engine(x)
        if self.is_last:
            loss = lm_loss(out, labels, self.topo.tp_group, self.num_valid_tokens)
            losses.append(loss.item())
            inflight.append((x, loss))
            return None
        inflight.append((x, out))
        return out

    def _backward(self, inflight: deque, grad_out):
        x, out = inflight.popleft()
        if self.is_last:
            self.engine.backward(out)  # the loss; DeepSpeed divides by grad_accum
        else:
            # d(sum(out * g))/d(out) = g, which already carries the last stage's 1/grad_accum.
            self.engine.backward((out * grad_out).sum(), scale_wrt_gas=False)
        end_backward(self.engine)  # the next backward may come before the next forward
        self.backwards_done += 1
        if self.backwards_done < self.cfg.train.grad_accum:
            self.engine.step()  # not the boundary: DeepSpeed only counts the micro-step
        return None if self.is_first else x.grad

    def _gathered_for_step(self):
        if self.cfg.parallel.pipe_zero3_gather == "step":
            return keep_gathered(list(self.engine.module.parameters()), self.ctx.deepspeed)
        return contextlib.nullcontext()

    def _mean_from_last_stage(self, losses: list[float]) -> float:
        """The mean loss over micro-batches and DP replicas, from the last stage to every rank."""
        value = torch.tensor([sum(losses) / len(losses) if losses else 0.0], dtype=torch.float64, device=comm_device())
        if self.is_last:
            dist.all_reduce(value, group=self.topo.get_data_parallel_group())
            value /= self.topo.layout.dp
        dist.broadcast(value, src=self.topo.pipe_peer(self.stages - 1), group=self.topo.get_pipe_parallel_group())
        return value.item()

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.engine.eval()
        losses, divisor = [], self.eval_divisor(batches)
        for batch in batches:  # fill and drain per batch: evaluation is small
            input_ids, labels = self.on_device(batch)
            x = input_ids if self.is_first else self._recv_forward()
            out = self.engine(x)
            if self.is_last:
                losses.append(lm_loss(out, labels, self.topo.tp_group, divisor).item())
            else:
                self._send(out, self.p2p.next)
        self.engine.train()
        return self._mean_from_last_stage(losses)


def _by_name(module: nn.Module) -> list[nn.Parameter]:
    """`module`'s parameters in the order of their names (the same on every stage)."""
    return [param for _, param in sorted(module.named_parameters(), key=lambda item: item[0])]
