"""Canonical (TP-merged, unpadded) weights in and out of a model that ZeRO-3 may partition."""
from __future__ import annotations

from pathlib import Path

import torch

from gptscale.atomic import atomic_write
from gptscale.config import ConfigError
from gptscale.convert.tp import merge_tp, split_tp
from gptscale.parallel.layers import split_table


def canonical_state_dict(dense_model) -> dict[str, torch.Tensor]:
    """A tp=1 model's weights in the canonical layout (vocabulary padding removed)."""
    return merge_tp([dense_model.state_dict()], split_table(dense_model), dense_model.cfg.vocab_size)


def save_canonical(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save

    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in weights.items()}))


def load_canonical_into(model, path: str | Path, deepspeed) -> None:
    """Copy canonical weights into a GPT `model` (this rank's TP shard), gathering ZeRO-3 partitions."""
    load_canonical_params(dict(model.named_parameters()), model.cfg, model.tp, path, deepspeed)


def load_canonical_params(params: dict, model_cfg, tp, path: str | Path, deepspeed) -> None:
    """Copy canonical weights into `params` (canonical name -> this rank's parameter: a whole
    model's or one pipeline stage's), split for TP rank `tp.rank` of `tp.size`. ZeRO-3
    partitions are gathered for the copy (for other parameters the gather is a no-op)."""
    from safetensors.torch import load_file

    from gptscale.model.gpt import GPT
    from gptscale.parallel.topology import TPGroup

    if not Path(path).is_file():
        raise ConfigError(f"train.init_from={str(path)!r} does not exist")
    canonical = load_file(str(path))
    with torch.device("meta"):
        dense = GPT(model_cfg, TPGroup(group=None, rank=0, size=tp.size))
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
