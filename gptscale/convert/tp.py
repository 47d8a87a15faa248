"""Split and merge tensor-parallel state dicts, driven by the layers' split table.

Pure functions over state dicts. The canonical (merged) layout has the real vocabulary
(`vocab_size` rows, no padding); shards have the vocabulary padded for their TP degree.
"""
from __future__ import annotations

import torch

from gptscale.config import LoRAConfig, ModelConfig
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import Split, split_table
from gptscale.parallel.lora import add_lora
from gptscale.parallel.topology import TPGroup

StateDict = dict[str, torch.Tensor]


def canonical_layout(cfg: ModelConfig, lora: LoRAConfig | None = None
                     ) -> tuple[dict[str, torch.Size], dict[str, Split]]:
    """Every canonical tensor's shape (vocabulary unpadded) and TP split, in the dense model's
    order, read off the model itself built on the meta device (nothing allocated); with
    `lora`, the adapters' too."""
    with torch.device("meta"):
        model = GPT(cfg, TPGroup.single())
        if lora is not None:
            add_lora(model, lora, seed=0)
    table = split_table(model)
    shapes = {name: torch.Size((cfg.vocab_size, *p.shape[1:])) if table[name] is Split.VOCAB else p.shape
              for name, p in model.named_parameters()}
    return shapes, table


def canonical_shapes(cfg: ModelConfig, lora: LoRAConfig | None = None) -> dict[str, torch.Size]:
    return canonical_layout(cfg, lora)[0]


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


def merge_tensor(pieces: list[torch.Tensor], split: Split, vocab_size: int) -> torch.Tensor:
    """One tensor's TP shards (in TP-rank order) -> the canonical tensor (vocabulary unpadded).
    No copy where none is needed: the result may be (a view of) a piece."""
    if split.dim is None or len(pieces) == 1:
        tensor = pieces[0]
    else:
        tensor = torch.cat(pieces, dim=split.dim)
    return tensor[:vocab_size] if split is Split.VOCAB else tensor


def merge_tp(shards: list[StateDict], table: dict[str, Split], vocab_size: int) -> StateDict:
    """One state dict per TP rank (in TP-rank order) -> the canonical state dict (new memory)."""
    return {name: merge_tensor([s[name] for s in shards], table[name], vocab_size).clone() for name in shards[0]}
