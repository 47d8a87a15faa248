"""The DeepSpeed internals the pipeline modes rely on are still where, and what, we expect
(runtime/pipe.py and runtime/pipe_zero3/ds_internals.py list them). If DeepSpeed moves them,
these fail loudly instead of a run hanging or silently cutting its stages elsewhere."""
import importlib
import inspect

import pytest

from gptscale.runtime.pipe_zero3 import ds_internals


@pytest.mark.parametrize("module", ds_internals.CALLERS)
def test_each_caller_still_imports_the_check_by_name(module):
    assert hasattr(importlib.import_module(module), ds_internals.NAME)


def test_the_check_still_broadcasts_from_global_rank_0_over_the_world():
    import deepspeed
    from deepspeed.runtime.zero import utils

    assert deepspeed.__version__.startswith(ds_internals.SUPPORTED)
    source = inspect.getsource(utils)  # the functions are wrapped by an NVTX decorator; read the module
    # No group argument: the world group, source global rank 0 (what deadlocks with one engine per stage).
    assert "dist.broadcast(rank0_len_tensor, src=0, async_op=False)" in source
    assert "dist.broadcast(lst_tensor, src=0, async_op=False)" in source
    assert "def assert_ints_same_as_other_ranks(ints: List[int]) -> None:" in source
    coordinator = inspect.getsource(importlib.import_module(ds_internals.CALLERS[0]))
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


def test_a_pipeline_module_takes_its_stage_boundaries_from_partition_layers():
    """runtime/pipe.py overrides `_partition_layers` to cut the stages where gptscale's partitioner says."""
    from deepspeed.runtime.pipe.module import PipelineModule

    init = inspect.getsource(PipelineModule.__init__)
    assert "self._partition_layers(method=partition_method)" in init
    assert init.index("self._partition_layers(") < init.index("self._build()")  # bounds first, then this stage's layers
    partition = inspect.getsource(PipelineModule._partition_layers)
    assert "self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])" in partition
    assert "self.parts" in inspect.getsource(PipelineModule.partitions)


def test_the_pipeline_engine_dispatches_instructions_through_its_instruction_map():
    """runtime/pipe.py's StageTimer shadows `_INSTRUCTION_MAP` on one engine to time its instructions."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert "self._INSTRUCTION_MAP[type(cmd)]" in inspect.getsource(PipelineEngine._exec_schedule)
    names = {kind.__name__ for kind in PipelineEngine._INSTRUCTION_MAP}
    assert {"ForwardPass", "BackwardPass"} <= names and schedule.ForwardPass in PipelineEngine._INSTRUCTION_MAP


def test_zero3_copies_a_gradient_partition_at_micro_step_0_and_adds_after():
    """accumulate_from_zero (interleaved 1F1B) relies on this rule and on the flat buffer."""
    import deepspeed.runtime.zero.stage3 as stage3

    source = inspect.getsource(stage3)
    assert "if self.micro_step_id == 0:  # don't accumulate" in source
    assert "self.grad_partitions_flat_buffer.narrow(" in source
