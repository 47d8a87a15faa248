"""Canonical (TP-merged, unpadded) weights in and out of live parameters, which ZeRO-3 may
partition: the dense model's weights as a safetensors file, and any source of canonical
weights (file, canonical or Hugging Face folder, training checkpoint) copied into any mode's
parameters (a whole model's or one pipeline stage's, this rank's TP shard only)."""
from __future__ import annotations

from pathlib import Path

import torch

from gptscale.atomic import atomic_write
from gptscale.checkpoint.convert import open_weights
from gptscale.convert.tp import canonical_layout, merge_tp
from gptscale.errors import ConfigError, UserError
from gptscale.parallel.layers import Split, split_table
from gptscale.parallel.lora import is_adapter


def canonical_state_dict(dense_model) -> dict[str, torch.Tensor]:
    """A tp=1 model's weights in the canonical layout (vocabulary padding removed)."""
    return merge_tp([dense_model.state_dict()], split_table(dense_model), dense_model.cfg.vocab_size)


def save_canonical(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save

    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in weights.items()}))


def tp_piece(source, name: str, split: Split, rank: int, tp: int, padded_vocab: int,
             kind: str = "weights") -> torch.Tensor:
    """TP rank `rank`'s piece of canonical tensor `name` (vocabulary rows padded with zeros):
    its weights, reading only that piece where the source can slice (safetensors), or its
    fp32 master weights or an Adam moment (kind "master", "exp_avg", "exp_avg_sq")."""
    shape = source.shapes[name]

    def read(index):
        if kind == "weights" and hasattr(source, "tensor_slice"):
            return source.tensor_slice(name, index)
        whole = source.tensor(name, "fp32" if kind == "weights" else kind)
        return whole if index is None else whole[index]

    if split.dim is None:
        return read(None)
    size = (padded_vocab if split is Split.VOCAB else shape[split.dim]) // tp
    start, stop = rank * size, (rank + 1) * size
    index = tuple([slice(None)] * split.dim + [slice(min(start, shape[split.dim]), min(stop, shape[split.dim]))])
    piece = read(index)
    if piece.shape[split.dim] < size:  # the vocabulary's padding rows
        padding = piece.new_zeros(size - piece.shape[0], *piece.shape[1:])
        piece = torch.cat([piece, padding])
    return piece


def load_canonical_params(params: dict, model_cfg, tp, path: str | Path, deepspeed, lora=None) -> None:
    """Copy canonical weights into `params` (canonical name -> this rank's parameter: a whole
    model's or one pipeline stage's), split for TP rank `tp.rank` of `tp.size`. `path`: a
    canonical folder or file, a Hugging Face folder, or a training checkpoint (any layout);
    each rank reads only its own pieces. ZeRO-3 partitions are gathered for the copy (for
    other parameters the gather is a no-op). With `lora` (the model carries adapters), a
    source without adapters is a base: the adapters keep their initial values."""
    try:
        source = open_weights(path, model_cfg)
    except UserError as err:
        raise ConfigError(f"train.init_from={str(path)!r}: {err}") from None
    expected, table = canonical_layout(model_cfg, lora)
    if not any(is_adapter(n) for n in source.shapes):
        params = {n: p for n, p in params.items() if not is_adapter(n)}
    missing = sorted(set(params) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    if missing or unexpected:
        hint = ("; it holds LoRA adapters: merge them first ('gptscale lora merge')"
                if any(is_adapter(n) for n in unexpected) else "")
        raise ConfigError(f"train.init_from={path}: weights do not fit model ({len(missing)} missing, e.g. "
                          f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}){hint}")
    wrong = [n for n in params if tuple(source.shapes[n]) != tuple(expected[n])]
    if wrong:
        raise ConfigError(f"train.init_from={path}: {wrong[0]} has shape {tuple(source.shapes[wrong[0]])}, the "
                          f"model (its config's model section) needs {tuple(expected[wrong[0]])}")
    padded = model_cfg.padded_vocab_size(tp.size)
    for name, param in params.items():
        piece = tp_piece(source, name, table[name], tp.rank, tp.size, padded)
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if tuple(param.shape) != tuple(piece.shape):
                raise ConfigError(f"train.init_from={path}: {name} has shape {tuple(piece.shape)} for this "
                                  f"rank, the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(piece)
