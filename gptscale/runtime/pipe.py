"""`parallel.mode: pipe`: TP x PP x DP on DeepSpeed's PipelineEngine (1F1B), ZeRO stage 0/1 over DP.

The GPT's stage layers (`model.stages`) become DeepSpeed `LayerSpec`s (a `TiedLayerSpec` for
GPT-2's embedding, shared by the first and last stage), cut where `stage_bounds` says. A
step is `train_batch` (1F1B over grad_accum micro-batches), validation is `eval_batch`.

DeepSpeed's rank grid (`PipeModelDataParallelTopology`: pipe slowest, model fastest) and
gptscale's `RankLayout` order ranks the same way; `_check_rank_grid` proves it for every
rank, so the TP groups our layers use and the stage / DP groups DeepSpeed builds agree.

DeepSpeed internals this mode relies on (checked in tests/unit/test_deepspeed_internals.py):
1. `PipelineModule._partition_layers` is where the module decides its stage boundaries; a
   subclass sets them to ours (`StagesCutByGptscale`).
2. `PipelineEngine._INSTRUCTION_MAP` dispatches every schedule instruction; an instance
   attribute of wrapped handlers times this engine's instructions (`StageTimer`).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from gptscale.model.compile import compile_blocks
from gptscale.model.loss import lm_loss
from gptscale.model.stages import StageLayer, describe_stages, stage_bounds, stage_layers
from gptscale.parallel.topology import Topology
from gptscale.runtime.base import Runtime, seed_all
from gptscale.runtime.stage_idle import BusyTimer, idle_fractions_per_stage
from gptscale.scaling.bubble import bubble_warning, theoretical_idle_fraction


class PipeRuntime(Runtime):
    @classmethod
    def describe(cls, cfg, ds_config) -> str:
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        return f"pipeline {cfg.parallel.pp} stages (1F1B, {cfg.train.grad_accum} micro-batches), ZeRO stage {zero}"

    def build(self):
        cfg, topo = self.cfg, self.topo
        warning = bubble_warning(cfg)
        if warning and dist.get_rank() == 0:
            print(f"gptscale: warning: {warning}", file=sys.stderr, flush=True)
        self.stage = topo.coords.pp
        self.layers = stage_layers(cfg.model, topo.tp_group)
        self.bounds = stage_bounds(cfg.model, topo.layout.pp, cfg.parallel.pipe_partition)
        if dist.get_rank() == 0:
            print(f"gptscale train: {describe_stages(self.layers, self.bounds)}", flush=True)
        seed_all(cfg.train.seed)  # every stage builds its layers from the same seed
        self.loss = StepLoss(topo.tp_group)
        self.module = build_pipeline_module(self.layers, self.bounds, topo, self.loss)
        compile_blocks(self.module, cfg.model)
        self.add_adapters(self._stage_layers())
        engine = self.initialize_engine(self.module, self.canonical_parameters())
        self.timer = StageTimer(engine)
        return engine

    def train_step(self, batches, step, nonfinite) -> float:
        micro, self.loss.num_valid_tokens = self.step_batches(batches)
        loss = self.engine.train_batch(iter(micro)).item()  # already the mean over micro-batches and DP
        self.step_timing = self.timer.take()  # this step's alone, whenever it is logged
        return loss

    def step_metrics(self) -> dict:
        measured = idle_fractions_per_stage(*self.step_timing, self.topo)
        return {"pipe_idle_fraction": measured,
                "pipe_idle_theory": theoretical_idle_fraction(self.topo.layout.pp, self.cfg.train.grad_accum)}

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.loss.num_valid_tokens = self.eval_divisor(batches)
        loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        self.engine.train()
        self.timer.take()  # evaluation is not part of a training step's bubble
        return float(loss)

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        """canonical name -> parameter, for this rank's stage (and TP shard)."""
        return {prefix + name: param for prefix, module in self._stage_layers()
                for name, param in module.named_parameters()}

    def _stage_layers(self) -> list[tuple[str, nn.Module]]:
        """(canonical name prefix, module) of each layer of this rank's stage."""
        start, stop = self.bounds[self.stage], self.bounds[self.stage + 1]
        return [(layer.prefix, self.module.tied_modules[layer.tie_key] if layer.tie_key is not None
                 else self.module.forward_funcs[offset]) for offset, layer in enumerate(self.layers[start:stop])]


class StepLoss:
    """The last stage's loss function: `lm_loss` divided by the current step's share of its
    labelled tokens (set before each step; None: each micro-batch's own mean)."""

    def __init__(self, tp):
        self.tp, self.num_valid_tokens = tp, None

    def __call__(self, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss(local_logits, labels, self.tp, self.num_valid_tokens)


def build_pipeline_module(layers: list[StageLayer], bounds: list[int], topo: Topology, loss_fn):
    """This rank's stage of the GPT as a PipelineModule, layers cut at `bounds`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    class StagesCutByGptscale(PipelineModule):
        """DeepSpeed's PipelineModule with gptscale's stage boundaries (internal 1 above)."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    layout = topo.layout
    grid = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    _check_rank_grid(topo, grid)
    specs = []
    for layer in layers:
        if layer.tie_key is not None:
            specs.append(TiedLayerSpec(layer.tie_key, layer.build, *layer.args, forward_fn=layer.forward_fn,
                                       tied_weight_attr=["embed.weight"]))
        else:
            specs.append(LayerSpec(layer.build, *layer.args))
    # Built without autograd: DeepSpeed broadcasts the tied weights in place while building,
    # which autograd would otherwise record as an op it cannot differentiate. Activation
    # recompute is the blocks' own (model.gpt.Block), not DeepSpeed's.
    with torch.no_grad():
        return StagesCutByGptscale(layers=specs, topology=grid, loss_fn=loss_fn, activation_checkpoint_interval=0)


def _check_rank_grid(topo: Topology, grid) -> None:
    layout = topo.layout
    for rank in range(layout.world_size):
        ours, theirs = layout.coords(rank), grid.get_coord(rank)
        if (ours.pp, ours.dp, ours.tp) != (theirs.pipe, theirs.data, theirs.model):
            raise RuntimeError(f"rank {rank}: gptscale places it at {ours}, DeepSpeed at {theirs}; "
                               f"the two rank orders must agree")


class StageTimer(BusyTimer):
    """Times the PipelineEngine's instructions on this stage, to measure the pipeline bubble
    (internal 2 above): its forward and backward passes are busy time (stage_idle.BusyTimer).
    For equal stages 1F1B's theory is (p - 1) / (m + p - 1)."""

    BUSY = ("ForwardPass", "BackwardPass")

    def __init__(self, engine):
        super().__init__()
        # The engine dispatches through the class attribute _INSTRUCTION_MAP; an instance
        # attribute of wrapped handlers shadows it for this engine only.
        engine._INSTRUCTION_MAP = {kind: self._timed(kind.__name__ in self.BUSY, handler)
                                   for kind, handler in type(engine)._INSTRUCTION_MAP.items()}

    def _timed(self, busy: bool, handler):
        def run(engine, **kwargs):
            started = self.begin()
            try:
                return handler(engine, **kwargs)
            finally:
                self.end(started, busy)
        return run
