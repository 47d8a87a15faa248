"""Adam's state put into a freshly built DeepSpeed engine from canonical tensors: how a run
saved at one layout continues at another (TP, PP, DP and mode may all change).

Each rank takes, for each of its parameters, its TP piece of the canonical fp32 master weight
and of both moments, and writes what its engine keeps of it:

- ZeRO-3 (zero3, pipe_zero3): this DP rank's partition of the piece (DeepSpeed's local API;
  the last partition is zero-padded as DeepSpeed pads it);
- ZeRO-1/2 (pipe): the fragment of the piece that DeepSpeed maps to this rank (`_hp_mapping`);
- no ZeRO (pipe, stage 0): the torch optimizer's state of the parameter itself.

torch's Adam creates its state at the first step, so the state is created here first, with
the step count the checkpoint's optimizer had (its bias correction continues, not restarts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO's optimizers wrap one)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def create_adam_state(engine, opt: torch.optim.Optimizer, step: int) -> None:
    """Adam's state for every tensor the optimizer steps, zero moments and `step` steps taken,
    as torch would hold it after `step` steps. Under ZeRO-3 those are the flat fp32 partitions,
    which DeepSpeed puts into the param groups only while it steps."""
    stepped = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if stepped is None:
        stepped = [p for group in opt.param_groups for p in group["params"]]
    for p in stepped:
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}


def load_adam_state(engine, params: dict[str, nn.Parameter], pieces, step: int) -> None:
    """`pieces(name, kind)` gives this rank's TP piece of canonical `name` for kind "master"
    (fp32 master weights), "exp_avg" or "exp_avg_sq"."""
    opt = torch_optimizer(engine)
    create_adam_state(engine, opt, step)
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the fragments to the new state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in params.items():
        if not param.requires_grad:
            continue
        for kind in ("master", *MOMENTS):
            _write(opt, param, pieces(name, kind), None if kind == "master" else kind)


def _write(opt: torch.optim.Optimizer, param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    value = value.to(torch.float32)
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition, zero-padded at the end
        size = param.ds_tensor.numel()
        start = dist.get_rank(group=param.ds_process_group) * size
        flat = value.flatten()
        local = torch.zeros(size, dtype=torch.float32)
        if start < flat.numel():
            part = flat[start:start + size]
            local[:part.numel()] = part
        local = local.to(param.ds_tensor.device)
        if key is None:
            safe_set_local_fp32_param(param, local)
            with torch.no_grad():  # the weights the next forward uses: the masters, in their dtype
                param.ds_tensor.copy_(local.view_as(param.ds_tensor))
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 (no mapping: no element of it on this DP rank)
        if param._hp_mapping is not None:
            param.set_full_hp_param(value.to(param.device), key)
        if key is None:
            with torch.no_grad():
                param.copy_(value.reshape(param.shape))
    elif key is None:
        with torch.no_grad():
            param.copy_(value)
    else:
        opt.state[param][key].copy_(value.reshape(param.shape))
