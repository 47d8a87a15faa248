"""Autograd-aware communication for tensor parallelism (Megatron-LM's f / g operators).

Each op is the adjoint of another, so gradients are correct by construction:

    copy_to_tp      forward: identity         backward: all-reduce (sum)
    reduce_from_tp  forward: all-reduce (sum) backward: identity
    gather_from_tp  forward: all-gather last dim   backward: keep own slice
    scatter_to_tp   forward: keep own slice         backward: all-gather last dim

Sequence parallelism (Korthikanti et al. 2022) splits the residual stream by sequence (dim 1
of (B, T, d)) between the tensor-parallel regions; an all-reduce becomes a reduce-scatter
plus an all-gather, the same bytes in a ring:

    gather_sequence          forward: all-gather dim 1     backward: reduce-scatter dim 1
    reduce_scatter_sequence  forward: reduce-scatter dim 1 backward: all-gather dim 1

With a single-rank TPGroup every op returns its input untouched, which is what makes a
tp=1 layer exactly its dense twin.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gptscale.parallel.topology import TPGroup


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous().clone()  # never reduce in place into a tensor autograd may have saved
    dist.all_reduce(x, group=tp.group)
    return x


def _all_gather_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=-1)


SEQUENCE_DIM = 1  # activations are (B, T, d)


def _all_gather_dim(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_dim(x: torch.Tensor, tp: TPGroup, dim: int) -> torch.Tensor:
    if x.shape[dim] % tp.size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the TP size {tp.size}")
    parts = [part.contiguous() for part in x.chunk(tp.size, dim=dim)]
    out = torch.empty_like(parts[tp.rank])
    dist.reduce_scatter(out, parts, group=tp.group)
    return out


def _own_slice_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if x.shape[-1] % tp.size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the TP size {tp.size}")
    return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_gather_last_dim(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last_dim(grad, ctx.tp), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _own_slice_last_dim(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.tp), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_gather_dim(x, tp, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.tp, SEQUENCE_DIM), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter_dim(x, tp, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.tp, SEQUENCE_DIM), None


def copy_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp)


def scatter_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ScatterToTP.apply(x, tp)


def gather_sequence(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """(B, T / tp, ...) on each rank -> (B, T, ...), the same on every rank of the group."""
    return x if tp.size == 1 else _GatherSequence.apply(x, tp)


def reduce_scatter_sequence(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Partial sums (B, T, ...) -> this rank's sequence slice of their sum, (B, T / tp, ...)."""
    return x if tp.size == 1 else _ReduceScatterSequence.apply(x, tp)


def sequence_slice(length: int, tp: TPGroup) -> slice:
    """The positions of a length-`length` sequence this TP rank holds under sequence parallelism."""
    local = length // tp.size
    return slice(tp.rank * local, (tp.rank + 1) * local)


def all_reduce_no_grad(x: torch.Tensor, tp: TPGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor outside autograd (statistics, masks); returns it."""
    if tp.size > 1:
        dist.all_reduce(x, op=op, group=tp.group)
    return x


def broadcast_from_tp_rank0(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Make every TP rank hold TP rank 0's `x` (e.g. a sampled token), in place; returns it."""
    if tp.size > 1:
        dist.broadcast(x, group=tp.group, group_src=0)
    return x
