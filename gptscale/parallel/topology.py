"""The rank grid (tp x dp x pp) and its process groups.

Rank order follows Megatron-LM and DeepSpeed's PipeModelDataParallelTopology: tensor
parallel is the fastest-varying axis (TP peers sit on neighbouring ranks, i.e. inside
a node), then data parallel, then pipeline (each stage is a contiguous block of
tp*dp ranks):

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

`RankLayout` is pure arithmetic, so every factorisation can be checked without
processes. `Topology` creates the torch.distributed groups once and hands them out;
it also is the `mpu` object that `deepspeed.initialize(mpu=...)` expects. There is no
module-level state: whoever needs a group is given the Topology.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptscale.config import ParallelConfig
from gptscale.errors import ConfigError

AXES = ("tp", "dp", "pp", "mp")  # mp = model parallel = the tp x pp ranks of one replica


@dataclass(frozen=True)
class Coords:
    tp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class RankLayout:
    tp: int
    dp: int
    pp: int

    def __post_init__(self) -> None:
        for axis in ("tp", "dp", "pp"):
            if getattr(self, axis) < 1:
                raise ConfigError(f"parallel.{axis}={getattr(self, axis)} must be >= 1")

    @classmethod
    def for_world(cls, world_size: int, parallel: ParallelConfig) -> "RankLayout":
        if world_size < 1:
            raise ConfigError(f"world size {world_size} must be >= 1")
        return cls(tp=parallel.tp, dp=parallel.resolve_dp(world_size), pp=parallel.pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    def rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return Coords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def groups(self, axis: str) -> list[list[int]]:
        """All groups along `axis`, each a sorted list of global ranks; they partition the world."""
        if axis == "tp":
            return [[self.rank(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]
        if axis == "dp":
            return [[self.rank(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        if axis == "pp":
            return [[self.rank(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]
        if axis == "mp":
            return [[self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]
        raise ValueError(f"unknown axis {axis!r}; one of {AXES}")

    def group_of(self, axis: str, rank: int) -> list[int]:
        return next(g for g in self.groups(axis) if rank in g)


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer needs to know: its group, its rank in it and the size.

    `TPGroup.single()` (group=None, size 1) makes every parallel layer its dense twin
    without touching torch.distributed.
    """

    group: object | None
    rank: int
    size: int
    # Megatron's sequence parallelism (parallel.sequence_parallel): between the TP regions each
    # rank holds 1/size of the sequence; layers built with this group enter and leave their
    # regions by all-gather and reduce-scatter instead of identity and all-reduce.
    sequence_parallel: bool = False

    @classmethod
    def single(cls) -> "TPGroup":
        return cls(group=None, rank=0, size=1)

    @classmethod
    def shape_only(cls, size: int) -> "TPGroup":
        """TP rank 0 of `size`, without a process group: builds a shard's shapes (on the meta
        device, or to read a checkpoint) where no communication happens."""
        return cls(group=None, rank=0, size=size)


class Topology:
    """Process groups for one rank of a RankLayout; also DeepSpeed's `mpu` interface."""

    def __init__(self, layout: RankLayout, rank: int, timeout_s: float | None = None,
                 sequence_parallel: bool = False):
        from datetime import timedelta

        import torch.distributed as dist

        if dist.get_world_size() != layout.world_size:
            raise ConfigError(f"parallel.tp*pp*dp={layout.tp}*{layout.pp}*{layout.dp}={layout.world_size} "
                              f"does not equal the launched world size {dist.get_world_size()}")
        self.layout = layout
        self.rank = rank
        self.sequence_parallel = sequence_parallel
        self.coords = layout.coords(rank)
        self._ranks: dict[str, list[int]] = {}
        self._groups: dict[str, object] = {}
        # Every rank must create every group, in the same order, even those it is not in.
        for axis in AXES:
            for ranks in layout.groups(axis):
                # new_group does not inherit the world's timeout: without one it waits torch's 30 minutes.
                group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s) if timeout_s else None)
                if rank in ranks:
                    self._ranks[axis], self._groups[axis] = ranks, group

    @classmethod
    def from_env(cls, parallel: ParallelConfig) -> "Topology":
        """Build from an initialised default process group."""
        import torch.distributed as dist

        layout = RankLayout.for_world(dist.get_world_size(), parallel)
        return cls(layout, dist.get_rank(), parallel.collective_timeout_s, parallel.sequence_parallel)

    def group(self, axis: str) -> object:
        return self._groups[axis]

    def ranks(self, axis: str) -> list[int]:
        return list(self._ranks[axis])

    @property
    def tp_group(self) -> TPGroup:
        return TPGroup(group=self._groups["tp"], rank=self.coords.tp, size=self.layout.tp,
                       sequence_parallel=self.sequence_parallel)

    def pipe_peer(self, stage: int) -> int | None:
        """The rank holding pipeline stage `stage` for this rank's TP and DP coordinates (None
        outside 0 .. pp-1): the neighbour a stage sends activations to or receives them from."""
        if not 0 <= stage < self.layout.pp:
            return None
        return self.layout.rank(tp=self.coords.tp, dp=self.coords.dp, pp=stage)

    def stage_mpu(self) -> "StageMpu":
        """This topology as the `mpu` of one pipeline stage's own ZeRO-3 engine (see StageMpu)."""
        return StageMpu(self)

    def describe(self) -> str:
        c, lay = self.coords, self.layout
        return (f"rank {self.rank}/{lay.world_size}: tp {c.tp}/{lay.tp}, dp {c.dp}/{lay.dp}, pp {c.pp}/{lay.pp}")

    # -- the `mpu` interface DeepSpeed calls (names are DeepSpeed's / Megatron's) ----------
    def get_tensor_model_parallel_group(self): return self._groups["tp"]
    def get_tensor_model_parallel_rank(self): return self.coords.tp
    def get_tensor_model_parallel_world_size(self): return self.layout.tp
    def get_tensor_model_parallel_src_rank(self): return self._ranks["tp"][0]

    # DeepSpeed's pipeline engine calls the TP axis the "slice".
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self): return self._groups["dp"]
    def get_data_parallel_rank(self): return self.coords.dp
    def get_data_parallel_world_size(self): return self.layout.dp
    def get_data_parallel_group_ranks(self): return self.ranks("dp")

    def get_pipe_parallel_group(self): return self._groups["pp"]
    def get_pipe_parallel_rank(self): return self.coords.pp
    def get_pipe_parallel_world_size(self): return self.layout.pp

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    # "Model parallel" (for ZeRO's grad-norm and overflow reductions) spans tp x pp.
    def get_model_parallel_group(self): return self._groups["mp"]
    def get_model_parallel_rank(self): return self._ranks["mp"].index(self.rank)
    def get_model_parallel_world_size(self): return self.layout.tp * self.layout.pp


class StageMpu:
    """The topology as DeepSpeed's `mpu` for one stage's ZeRO-3 engine (parallel.mode=pipe_zero3):
    data parallelism over the stage's DP group; the model-parallel group spans TP x PP, so the
    gradient norm and the overflow check cover every stage, while the model-parallel rank and
    size are the TP ones, so each stage counts its replicated parameters (norms, biases) once
    and writes one checkpoint file per TP rank."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def __getattr__(self, name):
        return getattr(self.topo, name)

    def get_model_parallel_rank(self):
        return self.topo.coords.tp

    def get_model_parallel_world_size(self):
        # DeepSpeed names and counts a stage's checkpoint files by these: one per TP rank.
        return self.topo.layout.tp
