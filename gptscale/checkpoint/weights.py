"""Canonical (TP-merged, unpadded) weights in and out of live parameters, which ZeRO-3 may
partition: the dense model's weights as a safetensors file, and such a file copied into any
mode's parameters (a whole model's or one pipeline stage's, this rank's TP shard)."""
from __future__ import annotations

from pathlib import Path

import torch

from gptscale.atomic import atomic_write
from gptscale.convert.tp import merge_tp, split_tp
from gptscale.errors import ConfigError
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import split_table
from gptscale.parallel.topology import TPGroup


def canonical_state_dict(dense_model) -> dict[str, torch.Tensor]:
    """A tp=1 model's weights in the canonical layout (vocabulary padding removed)."""
    return merge_tp([dense_model.state_dict()], split_table(dense_model), dense_model.cfg.vocab_size)


def save_canonical(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save

    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in weights.items()}))


def load_canonical_params(params: dict, model_cfg, tp, path: str | Path, deepspeed) -> None:
    """Copy canonical weights into `params` (canonical name -> this rank's parameter: a whole
    model's or one pipeline stage's), split for TP rank `tp.rank` of `tp.size`. ZeRO-3
    partitions are gathered for the copy (for other parameters the gather is a no-op)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"train.init_from={str(path)!r} does not exist")
    canonical = load_file(str(path))
    with torch.device("meta"):
        dense = GPT(model_cfg, TPGroup.shape_only(tp.size))
    table = split_table(dense)
    missing = sorted(set(params) - set(canonical))
    unexpected = sorted(set(canonical) - set(table))
    if missing or unexpected:
        raise ConfigError(f"train.init_from={path}: weights do not fit model ({len(missing)} missing, e.g. "
                          f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    needed = {name: canonical[name] for name in params}
    shard = split_tp(needed, {name: table[name] for name in needed}, tp.size, dense.padded_vocab)[tp.rank]
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if tuple(param.shape) != tuple(shard[name].shape):
                raise ConfigError(f"train.init_from={path}: {name} has shape {tuple(shard[name].shape)} for this "
                                  f"rank, the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(shard[name])
