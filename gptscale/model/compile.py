"""`model.compile`: torch.compile of each transformer block's computation, in every run mode.

What is compiled is `Block._forward` of each block instance, never `Block.forward`:
- `Block` is a DeepSpeed ZeRO-3 leaf module (ds_configs/zero3.json); the pre/post-forward hooks
  that gather and release its parameters run around `forward` and must stay eager, outside
  any compiled frame (dynamo would otherwise trace into DeepSpeed's gather/release code).
- `Block.forward` wraps `_forward` in activation checkpointing (`full`), which also stays
  eager: torch's checkpoint then recomputes the compiled function in backward.
Training and evaluation (no KV cache) take the compiled path; KV-cache decoding stays eager,
since the cache grows one token per call and every new length would be a new graph.

Shapes are compiled static (`dynamic=False`): one graph per block for the training shape
and one more for an evaluation or last batch of another size, not a dynamic-shape graph.
Guards: under ZeRO-3 a block's parameters are whole while its `forward` runs (gathered by
the leaf hooks) and empty partitions otherwise; dynamo sees them only inside `forward`, so
the swap of `param.data` causes no recompiles (tests/parallel/test_compile.py counts them).
Dropout inside the graph draws inductor's own random numbers, seeded from torch's global
generator: a given seed and RNG state give the same masks, so resume stays bit-exact, but
the masks differ from eager mode's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gptscale.config import ModelConfig
from gptscale.model.gpt import Block


def compile_blocks(module: nn.Module, cfg: ModelConfig) -> int:
    """With `cfg.compile`, compile `_forward` of every `Block` under `module` (a GPT, a
    pipeline stage, any module holding blocks); returns how many were compiled (0 when off)."""
    if not cfg.compile:
        return 0
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block._forward = _cached_calls_eager(block._forward)  # an instance attribute: shadows Block._forward
    return len(blocks)


def _cached_calls_eager(eager):
    """`eager` compiled for calls without a KV cache; calls with one run `eager` itself."""
    compiled = torch.compile(eager, dynamic=False)

    def forward(x, rope, cache=None, layer=0):
        if cache is None:
            return compiled(x, rope)
        return eager(x, rope, cache, layer)

    forward.compiled = compiled  # for tests and `gptscale info`-style introspection
    return forward
