"""The rank harness reports failures and never hangs the suite."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from gptscale.testing.distributed import RankFailure, run_ranks

pytestmark = pytest.mark.dist


def _sum_ranks():
    t = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(t)
    return t.item(), dist.get_world_size()


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever without the harness


def _rank0_dies():
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()


def _sleeps():
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_ranks(_sum_ranks, 3, timeout=60) == [(6, 3)] * 3


def test_a_failing_rank_reports_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="(?s)rank 1.*ValueError: boom on rank one"):
        run_ranks(_rank1_raises, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_a_rank_dying_silently_is_reported():
    with pytest.raises(RankFailure, match="rank 0 exited with code 3 without reporting"):
        run_ranks(_rank0_dies, 2, timeout=60)


def test_a_hanging_run_times_out():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="timed out after 8s"):
        run_ranks(_sleeps, 2, timeout=8)
    assert time.monotonic() - start < 20
