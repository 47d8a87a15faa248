"""LoRA adapters merged into their base weights: a canonical folder without adapters."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gptscale.checkpoint.adapter import AdapterFolder
from gptscale.checkpoint.canonical import write_canonical
from gptscale.checkpoint.convert import open_source
from gptscale.config import RunConfig
from gptscale.convert.peft import merged_weight
from gptscale.errors import ConfigError
from gptscale.parallel.lora import is_adapter


class MergedSource:
    """A source of canonical weights (checkpoint.canonical.Source) whose adapted weights are
    W + (alpha / rank) B A, computed one layer at a time as they are written."""

    def __init__(self, source, adapters: dict[str, torch.Tensor], scaling: float, cfg: RunConfig):
        self.source, self.adapters, self.scaling = source, adapters, scaling
        self.cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, method="full"))
        self.shapes = {n: s for n, s in source.shapes.items() if not is_adapter(n)}
        self.tokenizer_dir = source.tokenizer_dir

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        weight = self.source.tensor(name, kind)
        module = name.removesuffix(".weight")
        a, b = self.adapters.get(f"{module}.lora_A.weight"), self.adapters.get(f"{module}.lora_B.weight")
        if a is None or not name.endswith(".weight"):
            return weight
        return merged_weight(weight, a, b, self.scaling)


def merge_into_canonical(source_path: str | Path, out: str | Path, adapter: str | None = None,
                         dtype: str = "fp32") -> int:
    """Merge the adapters of a LoRA checkpoint (or `adapter` into the base `source_path`) and
    write a canonical folder `out`; returns how many layers were adapted."""
    source = open_source(source_path)
    if adapter is not None:
        if source.cfg.lora is not None:
            raise ConfigError(f"{source_path} already carries LoRA adapters; merge them alone (no --adapter)")
        folder = AdapterFolder(adapter, source.cfg.model, source_path)
        adapters, lora = folder.tensors(), folder.lora
    elif source.cfg.lora is not None:
        lora = source.cfg.lora
        adapters = {name: source.tensor(name) for name in source.names if is_adapter(name)}
    else:
        raise ConfigError(f"{source_path} holds no LoRA adapters; pass --adapter ADAPTER_FOLDER to merge one into it")
    write_canonical(MergedSource(source, adapters, lora.scaling, source.cfg), out, dtype)
    return len(adapters) // 2
