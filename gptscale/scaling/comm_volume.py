"""The bytes one rank sends in one training step, by kind, from the run config alone: what
`gptscale.testing.comm` measures at every torch.distributed call (ring convention: an
all-gather or reduce-scatter of S bytes over n ranks sends S (n-1)/n, an all-reduce twice
that, a point-to-point send S). Checked against measured steps by
tests/parallel/test_comm_volume.py and printed by bench/comm_volume.py.

Per micro-batch, A = micro_batch x seq_len x n_embd activation bytes:
- tensor parallelism: one all-reduce of A (or, with sequence parallelism, an all-gather
  plus a reduce-scatter: the same bytes) where the embedding leaves its TP region and at
  each block's attention and MLP outputs in forward, at each block's attention and MLP
  inputs and at the head's input in backward: 2 + 4L per micro-batch for the whole model
  (a pipeline stage counts its own blocks, the embedding on the first stage, the head on the
  last); the vocabulary-parallel loss adds three all-reduces of micro_batch x seq_len fp32
  scalars; with sequence parallelism the replicated parameters' gradients are all-reduced
  once per micro-batch (they see one slice of the sequence each);
- ZeRO-3 (zero3 mode, every parameter partitioned: `stage3_param_persistence_threshold: 0`):
  one all-gather of the rank's parameters per micro-batch (its backward reuses them: the
  model is within `stage3_max_reuse_distance`), one reduce-scatter of their fp32 gradients;
- the PipelineEngine with ZeRO-1: one all-reduce of the stage's fp32 gradients and one
  all-gather of its updated parameters per step; m activations sent forward and m gradients
  back, each 1/tp of A with `pipe_partitioned` (the receiving TP group all-gathers them, and
  a stage that sent activations gathers its outputs again for backward).
Small all-reduces (loss, gradient norm, overflow flags: bytes, not kilobytes) are left out.
"""
from __future__ import annotations

from gptscale import modes
from gptscale.config import RunConfig
from gptscale.model.counting import norm_parameters, replicated_per_block
from gptscale.scaling.estimate import PRECISION_BYTES, stage_tensors


def _ring(kind: str, size: float, n: int) -> float:
    return 0.0 if n <= 1 else (2 if kind == "all_reduce" else 1) * size * (n - 1) / n


def step_bytes(cfg: RunConfig, dp: int, stage: int = 0) -> dict[str, float]:
    """Bytes one rank of pipeline stage `stage` sends in one step, by group: tp, dp, p2p
    (sends to the neighbouring stages) and p2p_gather (the TP group's all-gathers of what
    pipe_partitioned split)."""
    m, t, pp = cfg.train.grad_accum, cfg.parallel.tp, cfg.parallel.pp
    b = PRECISION_BYTES[cfg.train.precision]
    act = cfg.train.micro_batch * cfg.data.seq_len * cfg.model.n_embd * b
    tensors = stage_tensors(cfg.model, t, pp, cfg.parallel.pipe_partition)[stage]
    first, last = tensors.first, tensors.last
    regions = 4 * tensors.blocks + (1 if first else 0) + (1 if last else 0)
    tp = regions * _ring("all_reduce", act, t)
    if last:
        tp += 3 * _ring("all_reduce", cfg.train.micro_batch * cfg.data.seq_len * 4, t)
    if cfg.parallel.sequence_parallel:
        tp += _ring("all_reduce", _replicated_elements(cfg, first, last, tensors.blocks) * b, t)
    out = {"tp": m * tp, "dp": 0.0, "p2p": 0.0, "p2p_gather": 0.0}
    spec = modes.resolve(cfg.parallel.mode, pp)
    if not spec.pipeline and 3 in spec.zero_stages:  # one ZeRO-3 engine over the whole model
        gathered = tensors.zero3_partition(dp) * dp * b
        out["dp"] = m * (_ring("all_gather", gathered, dp) + _ring("reduce_scatter", tensors.zero3_partition(dp) * dp * 4, dp))
    elif spec.pipeline and 3 not in spec.zero_stages:  # DeepSpeed's PipelineEngine with ZeRO-0/1
        out["dp"] = _ring("all_reduce", tensors.total * 4, dp) + _ring("all_gather", tensors.total * b, dp)
        sends = (0 if last else m) + (0 if first else m)  # activations forward, gradients back
        out["p2p"] = sends * act / t
        gathers = (0 if first else m) + (0 if last else 2 * m)  # received activations; gradients and own outputs
        out["p2p_gather"] = gathers * _ring("all_gather", act, t)
    else:
        raise ValueError(f"no communication theory for parallel.mode={spec.name} here")
    return out


def _replicated_elements(cfg: RunConfig, first: bool, last: bool, blocks: int) -> int:
    """Elements of the replicated parameters a stage uses on its sequence slice: every norm,
    the row-parallel biases, learned positions."""
    model = cfg.model
    total = blocks * replicated_per_block(model)
    if first and not model.uses_rope:
        total += model.block_size * model.n_embd
    if last:
        total += norm_parameters(model)
    return total
