"""`parallel.mode: pipe_zero3`: pipeline stages whose parameters, gradients and optimizer
states are ZeRO-3-partitioned over the stage's data-parallel group (what DeepSpeed's
PipelineEngine refuses).

Each stage is a plain module (its slice of the GPT's stage layers) wrapped in its own ZeRO-3
`DeepSpeedEngine` over its DP group; TP works inside it as usual. gptscale's own 1F1B
schedule moves activations forward and their gradients back with point-to-point
send/receive. The last stage back-propagates its loss through `engine.backward`; the
others back-propagate a surrogate scalar sum(output * received gradient), whose gradient
with respect to the output is exactly the received one, so gathering, reduce-scattering
and partitioning stay DeepSpeed's. ZeRO-3's own consistency checks are scoped to the
stage's DP group (`zero3_internals`).

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
from torch.utils.checkpoint import checkpoint

from gptscale.config import RunConfig
from gptscale.engine.launch_env import comm_device
from gptscale.engine.schedule import lr_factor
from gptscale.engine.trainer import Trainer, _param_groups, _seed_all
from gptscale.engine.weights import load_canonical_params
from gptscale.engine.zero3_internals import end_backward, keep_gathered, scope_checks_to
from gptscale.model.pipe import PipeBlock, PipelineLoss, StageLayer, stage_layers
from gptscale.parallel.topology import TPGroup, Topology

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stage_bounds(cfg: RunConfig, pp: int) -> list[int]:
    """Layer boundaries [b0=0, b1, ..., bp=L] of the pp stages (the same on every rank)."""
    from deepspeed.runtime import utils as ds_utils

    with torch.device("meta"):
        layers = stage_layers(cfg.model, TPGroup(group=None, rank=0, size=1))
        if cfg.parallel.pipe_partition == "blocks":
            weights = [1 if layer.is_block else 0 for layer in layers]
        else:
            weights = [sum(p.numel() for p in layer.build(*layer.args).parameters()) for layer in layers]
    return ds_utils.partition_balanced(weights=weights, num_parts=pp)


class StageModule(nn.Module):
    """Layers [start, stop) of the GPT's stage layers, applied in order."""

    def __init__(self, layers: list[StageLayer], start: int, stop: int, recompute_blocks: bool):
        super().__init__()
        self.specs = layers[start:stop]
        self.layers = nn.ModuleList(layer.build(*layer.args) for layer in self.specs)
        self.recompute_blocks = recompute_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.recompute_blocks and self.training and isinstance(layer, PipeBlock):
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        return {spec.prefix + name: param for spec, layer in zip(self.specs, self.layers)
                for name, param in layer.named_parameters()}

    @staticmethod
    def canonical_name(specs: list[StageLayer], name: str) -> str:
        """'layers.3.attn.qkv.weight' of a stage -> its canonical name."""
        _, index, rest = name.split(".", 2)
        return specs[int(index)].prefix + rest


class StageMpu:
    """The topology as DeepSpeed's `mpu` for one stage's ZeRO-3 engine: data parallelism over
    the stage's DP group; the model-parallel group spans TP x PP, so the gradient norm and
    the overflow check cover every stage, while the model-parallel rank and size are the
    TP ones, so each stage counts its replicated parameters (norms, biases) once and writes
    one checkpoint file per TP rank."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def __getattr__(self, name):
        return getattr(self.topo, name)

    def get_model_parallel_rank(self):
        return self.topo.coords.tp

    def get_model_parallel_world_size(self):
        # DeepSpeed names and counts a stage's checkpoint files by these: one per TP rank.
        return self.topo.layout.tp


class P2P:
    """Point-to-point transfers between neighbouring stages (same TP and DP coordinates)."""

    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype):
        c, layout = topo.coords, topo.layout
        self.prev = layout.rank(tp=c.tp, dp=c.dp, pp=c.pp - 1) if c.pp > 0 else None
        self.next = layout.rank(tp=c.tp, dp=c.dp, pp=c.pp + 1) if c.pp < layout.pp - 1 else None
        self.shape, self.dtype = shape, dtype

    def exchange(self, send: list[tuple[torch.Tensor, int]], recv_from: list[int]) -> list[torch.Tensor]:
        """Post every send and receive at once, then wait: neighbours exchanging in opposite
        directions never wait on each other's blocking send."""
        received = [torch.empty(self.shape, dtype=self.dtype, device=comm_device()) for _ in recv_from]
        requests = [dist.isend(t.contiguous(), peer) for t, peer in send]
        requests += [dist.irecv(buf, peer) for buf, peer in zip(received, recv_from)]
        for request in requests:
            request.wait()
        return received


class PipeZero3Trainer(Trainer):
    mode = "pipe_zero3"

    def describe_mode(self) -> str:
        c = self.cfg
        return (f"pipe_zero3: {c.parallel.pp} stages, each ZeRO stage 3 over its DP group (1F1B, "
                f"{c.train.grad_accum} micro-batches, parameters gathered per {c.parallel.pipe_zero3_gather})")

    def _build_engine(self) -> None:
        cfg, ds, topo = self.cfg, self.deepspeed, self.topo
        scope_checks_to(topo.get_data_parallel_group())
        self.stage, self.stages = topo.coords.pp, topo.layout.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == self.stages - 1
        bounds = stage_bounds(cfg, self.stages)
        self.layers = stage_layers(cfg.model, topo.tp_group)
        self.stage_specs = self.layers[bounds[self.stage]:bounds[self.stage + 1]]
        mpu = StageMpu(topo)
        # Each stage saves under its own tag (stage00, stage01, ...) by design.
        self.ds_config.setdefault("checkpoint", {})["tag_validation"] = "Ignore"
        _seed_all(cfg.train.seed + self.stage)
        with ds.zero.Init(config_dict_or_path=self.ds_config, mpu=mpu,
                          data_parallel_group=topo.get_data_parallel_group()):
            module = StageModule(self.layers, bounds[self.stage], bounds[self.stage + 1],
                                 cfg.model.activation_checkpointing)
        if cfg.train.init_from:
            load_canonical_params(module.canonical_parameters(), cfg.model, topo.tp_group, cfg.train.init_from, ds)
        self.engine, _, _, _ = ds.initialize(
            model=module, model_parameters=_param_groups(module, cfg.train.weight_decay), config=self.ds_config,
            mpu=mpu, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train)))
        self.loss_fn = PipelineLoss(topo.tp_group)
        shape = (cfg.train.micro_batch, cfg.data.seq_len, cfg.model.n_embd)
        self.p2p = P2P(topo, shape, _DTYPES[cfg.train.precision])
        self.checkpoint_subdir = f"stage{self.stage:02d}"
        _seed_all(cfg.train.seed + 1000 * topo.coords.dp + 1)

    # -- one optimizer step: 1F1B ----------------------------------------------------------
    def train_step(self, iterator, step: int) -> float:
        m = self.cfg.train.grad_accum
        warmup = min(self.stages - self.stage - 1, m)
        inflight: deque = deque()
        losses: list[float] = []
        self.backwards_done = 0
        with self._gathered_for_step():
            x = None
            for _ in range(warmup):
                x = self._forward(next(iterator), inflight, losses, self._recv_forward())
                self._send(x, self.p2p.next)
            if m > warmup:
                x = self._recv_forward()
            for i in range(m - warmup):
                out = self._forward(next(iterator), inflight, losses, x)
                grad_out = self._exchange(out, self.p2p.next, self.p2p.next)  # send activation, receive its gradient
                x_grad = self._backward(inflight, grad_out)
                last = i == m - warmup - 1
                x = self._exchange(x_grad, self.p2p.prev, None if last else self.p2p.prev)
            for _ in range(warmup):
                x_grad = self._backward(inflight, self._exchange(None, None, self.p2p.next))
                self._send(x_grad, self.p2p.prev)
        # The boundary step last, once every gradient has been passed on: its gradient norm is
        # an all-reduce over all stages, which a stage still waiting for a gradient would block.
        self.engine.step()
        return self._count_applied_step(self._mean_from_last_stage(losses), step)

    def _recv_forward(self) -> torch.Tensor | None:
        return self._exchange(None, None, self.p2p.prev)

    def _send(self, tensor, peer) -> None:
        self._exchange(tensor, peer, None)

    def _exchange(self, tensor, send_to, recv_from):
        send = [(tensor.detach(), send_to)] if tensor is not None and send_to is not None else []
        received = self.p2p.exchange(send, [recv_from] if recv_from is not None else [])
        return received[0] if received else None

    def _forward(self, batch, inflight: deque, losses: list[float], received):
        input_ids, labels = self._on_device(batch)
        x = input_ids if self.is_first else received.requires_grad_()
        out = self.engine(x)
        if self.is_last:
            loss = self.loss_fn(out, labels)
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
            return keep_gathered(list(self.engine.module.parameters()), self.deepspeed)
        return contextlib.nullcontext()

    def _mean_from_last_stage(self, losses: list[float]) -> float:
        """The mean loss over micro-batches and DP replicas, from the last stage to every rank."""
        value = torch.tensor([sum(losses) / len(losses) if losses else 0.0], dtype=torch.float64, device=comm_device())
        if self.is_last:
            dist.all_reduce(value, group=self.topo.get_data_parallel_group())
            value /= self.topo.layout.dp
        last = self.topo.layout.rank(tp=self.topo.coords.tp, dp=self.topo.coords.dp, pp=self.stages - 1)
        dist.broadcast(value, src=last, group=self.topo.get_pipe_parallel_group())
        return value.item()

    @torch.no_grad()
    def evaluate(self, held_out) -> float:
        self.engine.eval()
        losses = []
        for batch in held_out:  # fill and drain per batch: evaluation is small
            input_ids, labels = self._on_device(batch)
            x = input_ids if self.is_first else self._recv_forward()
            out = self.engine(x)
            if self.is_last:
                losses.append(self.loss_fn(out, labels).item())
            else:
                self._send(out, self.p2p.next)
        self.engine.train()
        return self._mean_from_last_stage(losses)

    def sample(self) -> str | None:
        from gptscale.engine.pipe_trainer import sample_from_final_checkpoint

        return sample_from_final_checkpoint(self)
