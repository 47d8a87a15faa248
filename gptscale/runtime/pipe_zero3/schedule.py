"""The order in which one pipeline stage runs its forwards and backwards: 1F1B, plain or
interleaved over virtual stages (Narayanan et al. 2021, section 2.2; Megatron-LM's
`forward_backward_pipelining_with_interleaving`).

With v virtual stages the layers are cut into p·v chunks and stage s holds chunks
s, p + s, ..., (v-1)p + s (its "model chunks" 0..v-1), so a micro-batch passes every stage v
times. The warm-up is longer, (p - s - 1)·2 + (v - 1)·p forwards, and the bubble shrinks
from (p-1)/m to (p-1)/(v·m) of the ideal step. Micro-batches go through in groups of p
(m must be a multiple of p when v > 1). v = 1 is the plain 1F1B schedule.

Pure arithmetic: `simulate` replays every stage's list with each op waiting for its input
(an activation from the previous chunk, a gradient from the next) and gives the makespan,
so tests check ordering, the absence of deadlock and the bubble without processes.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptscale.scaling.formulas import one_f_one_b_warmup


@dataclass(frozen=True)
class Op:
    backward: bool
    micro: int  # micro-batch index, 0 .. m-1
    chunk: int  # this stage's model chunk, 0 .. v-1


def stage_ops(stages: int, stage: int, micro_batches: int, virtual: int = 1) -> list[Op]:
    """Stage `stage`'s forwards and backwards for one optimizer step, in order."""
    p, m, v = stages, micro_batches, virtual
    if v > 1 and m % p:
        raise ValueError(f"interleaved 1F1B takes micro-batches in groups of the {p} stages; {m} is not a multiple")
    total = m * v
    warmup = one_f_one_b_warmup(p, stage, m, v)

    def op(k: int, backward: bool) -> Op:
        chunk = (k // p) % v if v > 1 else 0
        micro = (k // (p * v)) * p + k % p if v > 1 else k
        return Op(backward, micro, v - 1 - chunk if backward else chunk)

    ops = [op(k, False) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [op(warmup + i, False), op(i, True)]
    ops += [op(k, True) for k in range(total - warmup, total)]
    return ops


def simulate(stages: int, micro_batches: int, virtual: int = 1, forward: float = 1.0,
             backward: float = 2.0) -> float:
    """The step's makespan when every stage runs `stage_ops` and each op starts once its input
    has arrived (transfers free, sends never block); a whole stage's forward of one micro-batch
    costs `forward`, so a chunk's costs forward / v. Raises on a deadlock."""
    p, v = stages, virtual
    queues = [stage_ops(p, s, micro_batches, v) for s in range(p)]
    done: dict[tuple[int, Op], float] = {}  # (stage, op) -> finish time
    clock = [0.0] * p
    position = [0] * p
    while any(position[s] < len(queues[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while position[s] < len(queues[s]):
                op = queues[s][position[s]]
                needed = _input_of(p, v, s, op)
                if needed is not None and needed not in done:
                    break
                start = max(clock[s], done[needed] if needed is not None else 0.0)
                clock[s] = start + (backward if op.backward else forward) / v
                done[(s, op)] = clock[s]
                position[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"deadlock: stages wait at {[queues[s][position[s]] for s in range(p)]}")
    return max(clock)


def _input_of(p: int, v: int, s: int, op: Op) -> tuple[int, Op] | None:
    """(stage, op) whose output `op` on stage `s` needs; None for the first forward of a
    micro-batch. The chunk after stage p-1's chunk c is stage 0's chunk c + 1."""
    if not op.backward:
        if s > 0:
            return s - 1, op
        return (p - 1, Op(False, op.micro, op.chunk - 1)) if op.chunk > 0 else None
    if s < p - 1:
        return s + 1, op
    if op.chunk < v - 1:
        return 0, Op(True, op.micro, op.chunk + 1)
    return s, Op(False, op.micro, op.chunk)  # the last chunk's loss: its own forward
