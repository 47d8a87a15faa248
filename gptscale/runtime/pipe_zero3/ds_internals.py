"""The five places where one ZeRO-3 engine per pipeline stage meets DeepSpeed's assumptions.

1. Keep ZeRO-3's consistency checks, but run them over the engine's own data-parallel group.

ZeRO-3 checks that ranks agree on the order in which they gathered parameters
(`assert_ints_same_as_other_ranks`, in PartitionedParameterCoordinator.reset_step, and in
the safe-mode / sanity-check paths). DeepSpeed implements it as a broadcast from global
rank 0 over the *world* group: correct when one engine spans the world, a deadlock when
each pipeline stage is its own ZeRO-3 engine over its own DP group (stage 1's ranks
broadcast while stage 0's wait for an activation). `scope_checks_to(group)` replaces the
function in the modules that call it by the same check over `group`, from the group's
first rank. One engine per process, so one group per process.

2. Advance ZeRO-3's micro-step after each backward (`end_backward`). ZeRO-3 advances it at
the next forward, but 1F1B runs a stage's backwards back to back in the cool-down, so the
schedule calls the optimizer's `clear_backward_seen_flag` itself after every backward.

3. Keep a stage's parameters gathered for a whole step (`keep_gathered`). Gathering them with
`GatheredParameters` alone does not stop ZeRO-3 from releasing each layer after its forward
and gathering it again for its backward (measured: the same all-gather volume). A parameter
is never released while `ds_active_sub_modules` is non-empty, so the step holds a marker in
it; on leaving, the marker goes first and `GatheredParameters` partitions as usual.

4. Count a tied parameter's gradient once in the global gradient norm (`count_once_in_grad_norm`).
GPT-2's tied embedding lives on the first and the last stage, each a copy in its own engine;
both hold the summed gradient before the step (runtime.py), and ZeRO-3's norm, summed over
the model-parallel group (TP x PP), would count it twice. On the last stage the norm reads
the copy's gradient as zero: `get_grad_norm_direct` (`_get_norm_groups` passes it the gradient
partitions and the parameters) or, with the optimizer offloaded, the per-parameter norms
`complete_grad_norm_calculation_for_cpu_offload` reads. The step still applies the gradient.

5. Accumulate every backward of an interleaved step (`accumulate_from_zero`). ZeRO-3 copies a
gradient partition at micro-step 0 and adds to it afterwards. With v model chunks a stage's
first backward is its last chunk's, so a parameter of another chunk first gets its gradient
at a later micro-step and would be added to the previous step's. Before the step's first
backward the partitions (`grad_partitions_flat_buffer`) are zeroed and the micro-step is
made 1: every backward adds, the first onto zeros, which is the copy.

DeepSpeed internals: checked for the versions in SUPPORTED; `tests/unit/test_deepspeed_internals.py`
fails if the names or the world-group broadcast this relies on move.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from gptscale.parallel.primitives import comm_device

SUPPORTED = ("0.19.",)
CALLERS = ("deepspeed.runtime.zero.partitioned_param_coordinator", "deepspeed.runtime.zero.partition_parameters",
           "deepspeed.runtime.zero.stage3")
NAME = "assert_ints_same_as_other_ranks"

_group = None


def assert_ints_same_in_group(ints: list[int]) -> None:
    """DeepSpeed's check, over this process's stage group: every rank's list equals its first rank's."""
    group = _group
    src = dist.get_global_rank(group, 0)
    length = torch.tensor([len(ints)], dtype=torch.long, device=comm_device())
    dist.broadcast(length, src=src, group=group)
    if length.item() != len(ints):
        raise RuntimeError(f"ZeRO-3 ranks of one stage disagree on a list length: rank {src} has {length.item()}, "
                           f"rank {dist.get_rank()} has {len(ints)}")
    first = torch.tensor(ints if dist.get_rank() == src else [-1] * len(ints), dtype=torch.long,
                         device=length.device)
    dist.broadcast(first, src=src, group=group)
    if first.cpu().tolist() != list(ints):
        raise RuntimeError(f"ZeRO-3 ranks of one stage disagree on parameter order: rank {src} {first.tolist()}, "
                           f"rank {dist.get_rank()} {list(ints)}")


def scope_checks_to(group) -> None:
    import importlib

    import deepspeed

    global _group
    if not deepspeed.__version__.startswith(SUPPORTED):
        raise RuntimeError(f"parallel.mode=pipe_zero3 relies on DeepSpeed internals checked for versions "
                           f"{', '.join(v + 'x' for v in SUPPORTED)}; this is DeepSpeed {deepspeed.__version__}. "
                           f"Pin deepspeed to a checked version or re-check gptscale/runtime/pipe_zero3/ds_internals.py")
    _group = group
    for name in CALLERS:
        module = importlib.import_module(name)
        if not hasattr(module, NAME):
            raise RuntimeError(f"{name} no longer has {NAME}; re-check gptscale/runtime/pipe_zero3/ds_internals.py")
        setattr(module, NAME, assert_ints_same_in_group)


def accumulate_from_zero(engine) -> None:
    """Zero the gradient partitions and make every backward of the step add to them (5. above)."""
    optimizer = engine.optimizer
    optimizer.grad_partitions_flat_buffer.zero_()
    optimizer.micro_step_id = 1


def end_backward(engine) -> None:
    """Advance ZeRO-3's micro-step after a backward (2. above); a no-op if no backward ran."""
    engine.optimizer.clear_backward_seen_flag()


NORM_SOURCES = ("self.get_grad_norm_direct(self.averaged_gradients[i], self.fp16_groups[i])",
                "self.complete_grad_norm_calculation_for_cpu_offload(self.fp16_groups[i])")

_HELD_FOR_STEP = -1  # a submodule id no real module has


@contextlib.contextmanager
def keep_gathered(params, deepspeed):
    """Gather `params` once and keep them gathered until the block ends (3. above)."""
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.add(_HELD_FOR_STEP)
        try:
            yield
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(_HELD_FOR_STEP)


def count_once_in_grad_norm(optimizer, params) -> None:
    """Leave `params`' gradients out of `optimizer`'s (ZeRO-3's) global gradient norm (4. above):
    another engine counts the same gradient."""
    import inspect
    import sys

    # The methods are wrapped by an NVTX decorator without functools.wraps: read the module.
    source = inspect.getsource(sys.modules[type(optimizer).__module__])
    if not all(call in source for call in NORM_SOURCES):
        raise RuntimeError("ZeRO-3 no longer computes its gradient norm through get_grad_norm_direct / "
                           "complete_grad_norm_calculation_for_cpu_offload; re-check "
                           "gptscale/runtime/pipe_zero3/ds_internals.py")
    left_out = {id(p) for p in params}
    direct, offloaded = optimizer.get_grad_norm_direct, optimizer.complete_grad_norm_calculation_for_cpu_offload

    def grad_norm_direct(gradients, group_params, *args, **kwargs):
        gradients = [g.new_zeros(1) if id(p) in left_out else g for g, p in zip(gradients, group_params)]
        return direct(gradients, group_params, *args, **kwargs)

    def grad_norm_offloaded(group_params, *args, **kwargs):
        norms = optimizer.norm_for_param_grads
        ids = [optimizer.get_param_id(p) for p in group_params if id(p) in left_out]
        kept = {i: norms.pop(i) for i in ids if i in norms}
        try:
            return offloaded(group_params, *args, **kwargs)
        finally:
            norms.update(kept)

    optimizer.get_grad_norm_direct = grad_norm_direct
    optimizer.complete_grad_norm_calculation_for_cpu_offload = grad_norm_offloaded
