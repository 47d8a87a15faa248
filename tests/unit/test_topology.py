"""Rank grid arithmetic: every factorisation partitions the world with TP fastest."""
import itertools

import pytest

from gptscale.config import ParallelConfig
from gptscale.errors import ConfigError
from gptscale.parallel.topology import AXES, RankLayout, Topology


def factorisations(world):
    return [(tp, pp, world // (tp * pp)) for tp, pp in itertools.product(range(1, world + 1), repeat=2)
            if world % (tp * pp) == 0]


ALL_LAYOUTS = [RankLayout(tp=tp, dp=dp, pp=pp) for world in (1, 2, 4, 8) for tp, pp, dp in factorisations(world)]


def test_there_are_all_the_factorisations():
    assert len(factorisations(8)) == 10 and len(ALL_LAYOUTS) == 1 + 3 + 6 + 10


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda l: f"tp{l.tp}-pp{l.pp}-dp{l.dp}")
def test_groups_partition_the_world(layout):
    world = set(range(layout.world_size))
    sizes = {"tp": layout.tp, "dp": layout.dp, "pp": layout.pp, "mp": layout.tp * layout.pp}
    for axis in AXES:
        groups = layout.groups(axis)
        flat = [r for g in groups for r in g]
        assert sorted(flat) == sorted(world), axis  # each rank exactly once
        assert all(len(g) == sizes[axis] for g in groups), axis
    for rank in world:
        c = layout.coords(rank)
        assert layout.rank(c.tp, c.dp, c.pp) == rank
        # Along an axis, members differ only in that axis' coordinate.
        for axis, keep in (("tp", ("dp", "pp")), ("dp", ("tp", "pp")), ("pp", ("tp", "dp"))):
            members = [layout.coords(r) for r in layout.group_of(axis, rank)]
            assert all(getattr(m, k) == getattr(c, k) for m in members for k in keep)
            assert sorted(getattr(m, axis) for m in members) == list(range(sizes[axis]))
        mp = layout.group_of("mp", rank)
        assert all(layout.coords(r).dp == c.dp for r in mp)
        # A TP group and a DP group meet in exactly this rank.
        assert set(layout.group_of("tp", rank)) & set(layout.group_of("dp", rank)) == {rank}


def test_megatron_rank_order():
    layout = RankLayout(tp=2, dp=2, pp=2)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours: inside a node
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]  # stages are contiguous blocks
    assert layout.groups("mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_bad_layouts():
    with pytest.raises(ConfigError, match=r"parallel.tp=0 must be >= 1"):
        RankLayout(tp=0, dp=1, pp=1)
    with pytest.raises(ConfigError, match="does not equal the world size 8"):
        RankLayout.for_world(8, ParallelConfig(tp=2, pp=2, dp=1))
    with pytest.raises(ValueError, match="outside a world of 4"):
        RankLayout(tp=2, dp=2, pp=1).coords(4)


def test_mpu_interface_has_what_deepspeed_calls():
    # The getters DeepSpeed 0.19 calls on `mpu` (runtime/engine.py, zero/, pipe/, utils.py).
    for name in ["get_model_parallel_group", "get_model_parallel_rank", "get_model_parallel_world_size",
                 "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
                 "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_src_rank",
                 "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size",
                 "get_data_parallel_group_ranks", "get_pipe_parallel_group", "get_pipe_parallel_rank",
                 "get_pipe_parallel_world_size", "get_pipeline_model_parallel_group",
                 "get_pipeline_model_parallel_rank", "get_pipeline_model_parallel_world_size",
                 "get_slice_parallel_group", "get_slice_parallel_rank", "get_slice_parallel_world_size"]:
        assert callable(getattr(Topology, name)), name
