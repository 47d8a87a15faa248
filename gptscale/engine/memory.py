"""What a ZeRO-3 rank holds for parameters, gradients and optimizer state, in bytes.

Counts the tensors DeepSpeed's stage-3 optimizer keeps resident, each storage once
(parameter partitions are views into flat buffers)."""
from __future__ import annotations

import torch


def zero3_resident_bytes(engine) -> dict[str, int]:
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

    parts = {
        "parameters": size(p.ds_tensor for p in engine.module.parameters()),
        "master_weights": size(opt.fp32_partitioned_groups_flat),
        "gradients": size([getattr(opt, "grad_partitions_flat_buffer", None),
                           *(t.grad for t in opt.fp32_partitioned_groups_flat)]),
        "optimizer_states": size(v for state in opt.optimizer.state.values() for v in state.values()),
    }
    parts["total"] = sum(parts.values())
    return parts
