"""The GPT's stage layers as a DeepSpeed `PipelineModule`, and what the pipeline mode needs
around it: canonical weights in and out of stages, and per-stage bubble timings.

DeepSpeed's rank grid (`PipeModelDataParallelTopology`: pipe slowest, model fastest) and
gptscale's `RankLayout` order ranks the same way; `build_pipeline_module` checks this, so
the TP groups our layers use and the stage / DP groups DeepSpeed builds agree.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptscale.config import RunConfig
from gptscale.engine.launch_env import comm_device
from gptscale.model.pipe import PipeBlock, PipelineLoss, StageLayer, layers_with_parameters, stage_layers
from gptscale.parallel.topology import Topology


def build_pipeline_module(cfg: RunConfig, topo: Topology, deepspeed):
    """This rank's stage of the GPT as a PipelineModule (layers partitioned over parallel.pp stages)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layout = topo.layout
    grid = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    for rank in range(layout.world_size):
        ours, theirs = layout.coords(rank), grid.get_coord(rank)
        if (ours.pp, ours.dp, ours.tp) != (theirs.pipe, theirs.data, theirs.model):
            raise RuntimeError(f"rank {rank}: gptscale places it at {ours}, DeepSpeed at {theirs}; "
                               f"the two rank orders must agree")
    specs = []
    for layer in stage_layers(cfg.model, topo.tp_group):
        if layer.tie_key is not None:
            specs.append(TiedLayerSpec(layer.tie_key, layer.build, *layer.args, forward_fn=layer.forward_fn,
                                       tied_weight_attr=["embed.weight"]))
        else:
            specs.append(LayerSpec(layer.build, *layer.args))
    interval = 1 if cfg.model.activation_checkpointing else 0
    # Built without autograd: DeepSpeed broadcasts the tied weights in place while building,
    # which autograd would otherwise record as an op it cannot differentiate.
    with torch.no_grad():
        return PipelineModule(
            layers=specs, topology=grid, loss_fn=PipelineLoss(topo.tp_group),
            partition_method="type:PipeBlock" if cfg.parallel.pipe_partition == "blocks" else "parameters",
            activation_checkpoint_interval=interval,
            # torch's non-reentrant checkpoint needs no DeepSpeed checkpointing configuration and
            # lets gradients reach the embedding; only blocks are recomputed.
            activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
            checkpointable_layers=[PipeBlock.__name__])


def local_layers(pipe_module, layers: list[StageLayer]) -> list[tuple[StageLayer, nn.Module]]:
    """(layer description, module) for each distinct module of this rank's stage."""
    out, seen = [], set()
    for offset in range(len(pipe_module.forward_funcs)):
        layer = layers[pipe_module._local_start + offset]
        module = (pipe_module.tied_modules[layer.tie_key] if layer.tie_key is not None
                  else pipe_module.forward_funcs[offset])
        if id(module) not in seen:
            seen.add(id(module))
            out.append((layer, module))
    return out


def canonical_parameters(pipe_module, layers: list[StageLayer]) -> dict[str, nn.Parameter]:
    """canonical name -> parameter, for this rank's stage (and TP shard)."""
    return {layer.prefix + name: param for layer, module in local_layers(pipe_module, layers)
            for name, param in module.named_parameters()}


def layer_file(ckpt: Path, layer_index: int, tp_rank: int) -> Path:
    """DeepSpeed's name for one pipeline layer's weights of one TP rank."""
    return ckpt / f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"


def load_pipeline_shards(ckpt: Path, cfg: RunConfig, tp: int) -> list[dict[str, torch.Tensor]]:
    """One canonical-named (vocabulary still padded) state dict per TP rank from a pipeline checkpoint."""
    from gptscale.parallel.topology import TPGroup

    with torch.device("meta"):
        layers = stage_layers(cfg.model, TPGroup(group=None, rank=0, size=tp))
    shards = []
    for tp_rank in range(tp):
        shard = {}
        for index in layers_with_parameters(layers):
            path = layer_file(ckpt, index, tp_rank)
            if not path.is_file():
                raise FileNotFoundError(f"pipeline checkpoint {ckpt} lacks {path.name}; it is incomplete or "
                                        f"was written by another model")
            state = torch.load(path, map_location="cpu", weights_only=True)
            shard.update({layers[index].prefix + name: tensor.float() for name, tensor in state.items()})
        shards.append(shard)
    return shards


class StageTimer:
    """Times the PipelineEngine's instructions on this stage, to measure the pipeline bubble.

    busy = this stage's forward + backward passes; the pipeline's span = from the first
    instruction of a step to the end of the last backward pass on any stage (stages start a
    step together: the previous step ended in collectives over all of them). A stage's
    idle fraction is 1 - busy / span: bubble plus waiting for slower stages. For equal
    stages 1F1B's theory is (p - 1) / (m + p - 1).
    """

    BUSY = ("ForwardPass", "BackwardPass")

    def __init__(self, engine):
        self.busy = 0.0
        self.start: float | None = None  # first instruction of the step
        self.last_busy_end: float | None = None
        # The engine dispatches through the class attribute _INSTRUCTION_MAP; an instance
        # attribute of wrapped handlers shadows it for this engine only.
        engine._INSTRUCTION_MAP = {kind: self._timed(kind.__name__ in self.BUSY, handler)
                                   for kind, handler in type(engine)._INSTRUCTION_MAP.items()}

    def _timed(self, busy: bool, handler):
        def run(engine, **kwargs):
            start = time.perf_counter()
            if self.start is None:
                self.start = start
            try:
                return handler(engine, **kwargs)
            finally:
                if busy:
                    self.last_busy_end = time.perf_counter()
                    self.busy += self.last_busy_end - start
        return run

    def take(self) -> tuple[float, float]:
        """(busy seconds, seconds from the step's start to this stage's last busy moment); resets."""
        busy = self.busy
        span = (self.last_busy_end - self.start) if self.start is not None and self.last_busy_end else 0.0
        self.busy, self.start, self.last_busy_end = 0.0, None, None
        return busy, span


def idle_fractions_per_stage(busy: float, span: float, topo: Topology) -> list[float]:
    """Every stage's idle fraction over the pipeline's span of one step (`StageTimer.take()`
    on each stage), in stage order, on every rank."""
    group = topo.get_pipe_parallel_group()
    device = comm_device()
    longest = torch.tensor([span], dtype=torch.float64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    mine = torch.tensor([1.0 - busy / longest.item() if longest.item() > 0 else float("nan")], dtype=torch.float64,
                        device=device)
    gathered = [torch.zeros_like(mine) for _ in range(topo.layout.pp)]
    dist.all_gather(gathered, mine, group=group)
    return [g.item() for g in gathered]


def theoretical_idle_fraction(stages: int, micro_batches: int) -> float:
    """1F1B/GPipe bubble share of a step for equal stages: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def bubble_warning(cfg: RunConfig) -> str | None:
    """A warning when too few micro-batches leave the pipeline idle much of each step."""
    p, m = cfg.parallel.pp, cfg.train.grad_accum
    if m >= p:
        return None
    return (f"train.grad_accum={m} micro-batches < parallel.pp={p} stages: {theoretical_idle_fraction(p, m):.0%} of "
            f"every step is pipeline bubble; raise train.grad_accum (>= {4 * p} keeps it under "
            f"{theoretical_idle_fraction(p, 4 * p):.0%})")
