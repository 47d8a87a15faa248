"""The DeepSpeed internals that pipe_zero3 re-scopes are still where, and what, we expect.
If DeepSpeed moves them, these fail loudly instead of pipe_zero3 hanging."""
import importlib
import inspect

import pytest

from gptscale.engine import zero3_internals


@pytest.mark.parametrize("module", zero3_internals.CALLERS)
def test_each_caller_still_imports_the_check_by_name(module):
    assert hasattr(importlib.import_module(module), zero3_internals.NAME)


def test_the_check_still_broadcasts_from_global_rank_0_over_the_world():
    import deepspeed
    from deepspeed.runtime.zero import utils

    assert deepspeed.__version__.startswith(zero3_internals.SUPPORTED)
    source = inspect.getsource(utils)  # the functions are wrapped by an NVTX decorator; read the module
    # No group argument: the world group, source global rank 0 (what deadlocks with one engine per stage).
    assert "dist.broadcast(rank0_len_tensor, src=0, async_op=False)" in source
    assert "dist.broadcast(lst_tensor, src=0, async_op=False)" in source
    assert "def assert_ints_same_as_other_ranks(ints: List[int]) -> None:" in source
    coordinator = inspect.getsource(importlib.import_module(zero3_internals.CALLERS[0]))
    assert "assert_ints_same_as_other_ranks([m.ds_id for m in self.__submodule_order])" in coordinator


def test_zero3_still_advances_its_micro_step_at_the_next_forward():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    clear = inspect.getsource(DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag)
    assert "self.micro_step_id += 1" in clear and "_epilogue_ran_this_backward" in clear
    assert "clear_backward_seen_flag()" in inspect.getsource(DeepSpeedEngine)


def test_a_parameter_with_an_active_submodule_is_never_released():
    from deepspeed.runtime.zero import partitioned_param_coordinator

    source = inspect.getsource(partitioned_param_coordinator)
    assert "if param.ds_status == ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:" in source
