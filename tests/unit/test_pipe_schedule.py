"""The pipeline schedule (runtime/pipe_zero3/schedule.py), replayed without processes: every
micro-batch passes every chunk forward then backward once, no stage waits forever, and the
idle time is the theory's (p-1)/(v·m) of the ideal step, plain and interleaved."""
import itertools

import pytest

from gptscale.runtime.pipe_zero3.schedule import Op, simulate, stage_ops


@pytest.mark.parametrize("p, m, v", [(p, m, v) for p, m, v in itertools.product((2, 3, 4), (4, 8, 12), (1, 2, 3))
                                     if v == 1 or m % p == 0])
def test_every_op_once_and_the_bubble_is_the_theory(p, m, v):
    for s in range(p):
        ops = stage_ops(p, s, m, v)
        assert sorted(ops, key=repr) == sorted({Op(b, i, c) for b in (False, True) for i in range(m)
                                                for c in range(v)}, key=repr)
        for i, c in itertools.product(range(m), range(v)):  # a chunk's backward after its forward
            assert ops.index(Op(True, i, c)) > ops.index(Op(False, i, c))
    makespan = simulate(p, m, v, forward=1.0, backward=2.0)
    ideal = 3.0 * m
    assert makespan - ideal == pytest.approx(ideal * (p - 1) / (v * m))


def test_plain_1f1b_warms_up_with_the_stages_after_it():
    ops = stage_ops(4, 1, 8)  # stage 1 of 4: two forwards ahead, then one forward, one backward
    assert ops[:4] == [Op(False, 0, 0), Op(False, 1, 0), Op(False, 2, 0), Op(True, 0, 0)]
    assert ops[-2:] == [Op(True, 6, 0), Op(True, 7, 0)]


def test_interleaving_needs_micro_batches_in_groups_of_the_stages():
    with pytest.raises(ValueError, match="6 is not a multiple"):
        stage_ops(4, 0, 6, 2)
