"""What a rank holds for parameters, gradients and optimizer state, in bytes.

Counts the tensors DeepSpeed's optimizer keeps resident between steps, each storage once
(parameter partitions are views into flat buffers). ZeRO-3 keeps parameter, master-weight
and gradient partitions; ZeRO-1 keeps whole parameters and partitioned master weights, and in
fp32 its whole-size gradients exist only during backward (not counted here); the BF16_Optimizer
of 16-bit pipeline runs keeps a whole fp32 gradient buffer."""
from __future__ import annotations

import torch


def resident_bytes(engine) -> dict[str, int]:
    opt = engine.optimizer
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list(engine.module.parameters())
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        parts = {
            "parameters": size(p.ds_tensor for p in params),
            "master_weights": size(opt.fp32_partitioned_groups_flat),
            "gradients": size([getattr(opt, "grad_partitions_flat_buffer", None),
                               *(t.grad for t in opt.fp32_partitioned_groups_flat)]),
        }
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer: 16-bit ZeRO-0/1 under the PipelineEngine
        parts = {"parameters": size(opt.bf16_groups_flat),
                 "master_weights": size(opt.fp32_groups_flat_partition),
                 "gradients": size(opt.fp32_groups_gradients_flat)}
    else:  # ZeRO-1/2 in fp32 under the PipelineEngine
        parts = {"parameters": size(p.data for p in params),
                 "master_weights": size(opt.single_partition_of_fp32_groups),
                 "gradients": 0}
    parts["optimizer_states"] = size(v for state in opt.optimizer.state.values() for v in state.values())
    parts["total"] = sum(parts.values())
    return parts
