"""LoRA on the tensor-parallel linears: y = W x + b + s * B (A x), s = alpha / rank.

The adapter is split the way its base layer is, so it adds no communication to the forward:

    base                  A (rank x in)           B (out x rank)       where B A x is added
    ColumnParallelLinear  replicated              split like W (COLUMN) to this rank's output slice
    VocabParallelHead     replicated              split like W (VOCAB)  to this rank's logits slice
    RowParallelLinear     split like W (ROW)      replicated            to the partial sum, before the all-reduce

A replicated adapter factor sees only this rank's share of the gradient (the column case's A
meets only the local rows of B; the row case's B meets only the local A_i x_i), so it enters
the forward through `copy_to_tp`, whose backward sums its gradient over the TP group: one
all-reduce of a (rank x in) or (out x rank) matrix per backward, and the replicas stay equal.

Initialisation does not depend on the TP size: the full A (PEFT's default, uniform in
+-1/sqrt(in)) is drawn from a generator seeded by (seed, the layer's canonical name) and
each rank keeps its slice; B starts at zero, so an adapted model starts as its base.
(Adapter dropout, when set, draws its mask on each rank's input: on the replicated input of
a column layer the same on every TP rank, on the split input of a row layer per slice, so
with dropout a TP run is a different random draw from a TP=1 run, not the same one.)
Every adapter weight carries its split tag (`tp_split`), the table checkpoint merge/split
and export read. Adapters are added after the model is built (`add_lora`), so every mode
adapts the same pieces: the whole GPT, a pipeline stage, DeepSpeed's PipelineModule; ZeRO-3
partitions them when the engine is built, like any parameter it has not seen yet.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptscale.config import LoRAConfig
from gptscale.errors import ConfigError
from gptscale.parallel.layers import (ColumnParallelLinear, RowParallelLinear, Split, VocabParallelHead, logits_loss,
                                      mark_split)
from gptscale.parallel.primitives import copy_to_tp, gather_from_tp, scatter_to_tp

ADAPTER_MARK = ".lora_"  # in the canonical name of every adapter weight, and of nothing else

# Short target name -> the last part of the canonical module names it adapts.
_TARGET_MODULES = {"qkv": ("attn.qkv",), "proj": ("attn.proj",), "up": ("mlp.up",), "gate": ("mlp.gate",),
                   "down": ("mlp.down",), "mlp": ("mlp.up", "mlp.gate", "mlp.down"), "head": ("head",)}


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


class _Factor(nn.Module):
    """One adapter matrix as a linear module of its own, so its name is `<layer>.lora_A.weight`
    (the names PEFT uses) and ZeRO-3 gathers it in its own forward like any layer's weight.
    A replicated factor enters through `copy_to_tp` (its gradient summed over the TP group)."""

    def __init__(self, weight: torch.Tensor, split: Split, tp):
        super().__init__()
        self.tp = tp
        self.weight = mark_split(nn.Parameter(weight), split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        replicated = self.weight.tp_split is Split.REPLICATED
        return F.linear(x, copy_to_tp(self.weight, self.tp) if replicated else self.weight)


class _LoRA:
    """What the adapted column and row layers share: the factors, the scale, merge / unmerge."""

    lora_A: _Factor
    lora_B: _Factor

    def _add_factors(self, lora: LoRAConfig, name: str, seed: int, a_split: Split, b_split: Split) -> None:
        r = lora.rank
        full_a = initial_a(r, self.in_features, seed, name)
        a = full_a if a_split.dim is None else full_a.chunk(self.tp.size, dim=1)[self.tp.rank]
        b_rows = self.weight.ds_shape[0] if hasattr(self.weight, "ds_shape") else self.weight.shape[0]
        if b_split.dim is None:
            b_rows = self.out_features
        dtype, device = self.weight.dtype, self.weight.device
        self.lora_A = _Factor(a.to(dtype=dtype, device=device).contiguous(), a_split, self.tp)
        self.lora_B = _Factor(torch.zeros(b_rows, r, dtype=dtype, device=device), b_split, self.tp)
        self.lora_scaling = lora.scaling
        self.lora_dropout = nn.Dropout(lora.dropout) if lora.dropout else nn.Identity()
        self.lora_merged = False

    def _delta(self) -> torch.Tensor:
        """s * B A for this rank's shard of W (fp32 arithmetic)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.lora_scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s * B A into W (for inference: one matmul per layer again). Not for ZeRO-3-partitioned weights."""
        if not self.lora_merged:
            self.weight.add_(self._delta().to(self.weight.dtype))
            self.lora_merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.lora_merged:
            self.weight.sub_(self._delta().to(self.weight.dtype))
            self.lora_merged = False


class LoRAColumnParallelLinear(_LoRA, ColumnParallelLinear):
    def forward(self, x: torch.Tensor, entered: bool = False) -> torch.Tensor:
        if not entered:
            x = self.region_input(x)  # its backward sums the input gradients of both paths
        y = F.linear(x, self.weight, self.bias)  # (..., out / tp)
        if not self.lora_merged:
            y = y + self.lora_scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))  # via (..., r)
        return gather_from_tp(y, self.tp) if self.gather_output else y


class LoRAVocabParallelHead(LoRAColumnParallelLinear, VocabParallelHead):
    def forward(self, x: torch.Tensor, entered: bool = False, *, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted logits; with `targets`, their loss summed over the labelled tokens,
        computed from them: the fused chunked loss takes one weight, and W x + s B (A dropout(x))
        is not one."""
        logits = super().forward(x, entered)
        return logits if targets is None else logits_loss(logits, targets, self.vocab_size, self.tp).sum()


class LoRARowParallelLinear(_LoRA, RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp)
        y = F.linear(x, self.weight)  # this rank's partial sum, (..., out)
        if not self.lora_merged:
            y = y + self.lora_scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))  # B (A_i x_i)
        return self.region_output(y)


# base class -> (adapted class, A's split, B's split); most specific first
_ADAPTED = ((VocabParallelHead, LoRAVocabParallelHead, Split.REPLICATED, Split.VOCAB),
            (ColumnParallelLinear, LoRAColumnParallelLinear, Split.REPLICATED, Split.COLUMN),
            (RowParallelLinear, LoRARowParallelLinear, Split.ROW, Split.REPLICATED))


def initial_a(rank: int, in_features: int, seed: int, name: str) -> torch.Tensor:
    """The full (rank x in) A of layer `name`, the same at every TP size: uniform in +-1/sqrt(in)
    (PEFT's kaiming_uniform_(a=sqrt(5)) default), from a generator of (seed, name)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(in_features)
    return torch.rand(rank, in_features, generator=g) * (2 * bound) - bound


def lora_module_names(module_names: list[str], lora: LoRAConfig) -> list[str]:
    """The canonical names of the modules among `module_names` that `lora.targets` adapt; a
    target that matches none of them is an error (a typo, or `gate` in a GPT-2)."""
    def matches(target: str) -> list[str]:
        suffixes = _TARGET_MODULES[target]
        return [n for n in module_names if (n == "head" and "head" in suffixes)
                or any(n.endswith("." + s) for s in suffixes if s != "head")]

    chosen = []
    for target in lora.target_names:
        matched = matches(target)
        if not matched:
            available = ", ".join(t for t in _TARGET_MODULES if matches(t))
            why = " (with tied embeddings the token embedding is the output projection)" if target == "head" else ""
            raise ConfigError(f"finetune.lora.targets: {target!r} matches no layer of this model{why}; choose among "
                              f"{available}")
        chosen += matched
    return sorted(set(chosen), key=module_names.index)


def add_lora(model: nn.Module, lora: LoRAConfig, seed: int, prefix: str = "",
             names: list[str] | None = None) -> list[str]:
    """Give the targeted parallel linears of `model` adapters, in place; returns their canonical
    names. `prefix` + a module's name inside `model` is its canonical name (a pipeline stage's
    layer); `names`: check the targets against these canonical module names instead (a
    pipeline stage holds only some of the model's layers)."""
    linears = {prefix + name: module for name, module in model.named_modules()
               if isinstance(module, (ColumnParallelLinear, RowParallelLinear))}
    wanted = set(lora_module_names(names if names is not None else list(linears), lora))
    adapted = []
    for name, module in linears.items():
        if name not in wanted:
            continue
        for base, cls, a_split, b_split in _ADAPTED:
            if isinstance(module, base):
                # Re-class the built layer in place: it keeps its (possibly ZeRO-partitioned)
                # weights and its name; the adapted class adds the adapter path to forward.
                module.__class__ = cls
                module._add_factors(lora, name, seed, a_split, b_split)
                adapted.append(name)
                break
    return adapted


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_adapter(name)}


def merge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _LoRA):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _LoRA):
            module.unmerge()
