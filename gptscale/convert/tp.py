"""Split and merge tensor-parallel state dicts, driven by the layers' split table.

Pure functions over state dicts. The canonical (merged) layout has the real vocabulary
(`vocab_size` rows, no padding); shards have the vocabulary padded for their TP degree.
"""
from __future__ import annotations

import torch

from gptscale.parallel.layers import Split

StateDict = dict[str, torch.Tensor]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] > rows:
        raise ValueError(f"cannot pad {tensor.shape[0]} vocabulary rows down to {rows}")
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def split_tp(full: StateDict, table: dict[str, Split], tp: int, padded_vocab: int) -> list[StateDict]:
    """Canonical state dict -> one state dict per TP rank (vocabulary padded to `padded_vocab`)."""
    shards: list[StateDict] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        split = table[name]
        if split is Split.VOCAB:
            tensor = _pad_rows(tensor, padded_vocab)
        if split.dim is None:
            pieces = [tensor.clone() for _ in range(tp)]
        else:
            if tensor.shape[split.dim] % tp:
                raise ValueError(f"{name}: dim {split.dim} of size {tensor.shape[split.dim]} "
                                 f"does not split into tp={tp} equal parts")
            pieces = [p.clone() for p in tensor.chunk(tp, dim=split.dim)]
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def merge_tp(shards: list[StateDict], table: dict[str, Split], vocab_size: int) -> StateDict:
    """One state dict per TP rank (in TP-rank order) -> the canonical state dict."""
    merged: StateDict = {}
    for name in shards[0]:
        split = table[name]
        if split.dim is None:
            merged[name] = shards[0][name].clone()
            continue
        tensor = torch.cat([s[name] for s in shards], dim=split.dim)
        merged[name] = tensor[:vocab_size].clone() if split is Split.VOCAB else tensor
    return merged
