"""A LoRA adapter folder: the adapters of a fine-tuning run without its base, small and on its own.

    ADAPTER/
      adapter_config.json        {"format": "gptscale-lora-1", "lora": {rank, alpha, dropout, targets},
                                  "model": the base model's config section, "base": where the run's
                                  base came from (train.init_from), "step": the training step}
      adapter_model.safetensors  canonical (TP-merged, unpadded) adapter tensors,
                                 `<layer>.lora_A.weight` (rank x in) and `<layer>.lora_B.weight` (out x rank)

Every LoRA checkpoint holds one (`adapter/`); `gptscale generate --adapter`, `convert to-hf
--adapter` (a PEFT folder) and `lora merge` read it. The folder may come from anyone: the
JSON is checked field by field and the tensors' names and shapes against the model before
any of them is used, so an adapter of another base is a one-line error.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from gptscale.atomic import atomic_write, write_text_atomic
from gptscale.checkpoint.sharded import ShardedSafetensors
from gptscale.config import LoRAConfig, ModelConfig
from gptscale.convert.tp import canonical_layout
from gptscale.errors import CheckpointError, ConfigError
from gptscale.parallel.lora import is_adapter
from gptscale.typed import from_dict

FORMAT = "gptscale-lora-1"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CHECKPOINT_SUBFOLDER = "adapter"  # inside a LoRA run's checkpoint folder
MAX_CONFIG_BYTES = 1 << 20


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], model: ModelConfig, lora: LoRAConfig,
                  base: str | None, step: int | None) -> None:
    """Write an adapter folder into `folder` (created; each file under a temporary name first)."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / WEIGHTS_FILE) as f:
        f.write(save({name: t.contiguous() for name, t in tensors.items()}, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "lora": _lora_dict(lora), "model": dataclasses.asdict(model), "base": base, "step": step}
    write_text_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def _lora_dict(lora: LoRAConfig) -> dict:
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets}


def adapter_folder_of(path: str | Path) -> Path:
    """An adapter folder, or the `adapter/` of a LoRA checkpoint."""
    path = Path(path)
    if (path / CHECKPOINT_SUBFOLDER / CONFIG_FILE).is_file():
        return path / CHECKPOINT_SUBFOLDER
    return path


class AdapterFolder:
    """An adapter folder, checked: its config, and its tensors against the model they adapt."""

    def __init__(self, path: str | Path, base: ModelConfig | None = None, base_name: str | Path | None = None):
        """`base`: the model the adapters are for (compared before anything is built from the
        folder's own claims); None: the model its config describes."""
        self.path = adapter_folder_of(path)
        config_file = self.path / CONFIG_FILE
        if not config_file.is_file() or not (self.path / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{path} is not a LoRA adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a LoRA "
                                  f"checkpoint holding one in {CHECKPOINT_SUBFOLDER}/; a fine-tuning run with "
                                  f"finetune.method=lora writes them")
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{config_file} is {config_file.stat().st_size} bytes, not an adapter config")
        try:
            meta = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{config_file}: not a gptscale adapter config (format {FORMAT!r}); for a PEFT "
                                  f"adapter, load it with peft on the exported base")
        try:
            self.lora: LoRAConfig = from_dict(LoRAConfig, meta.get("lora"), "lora")
            self.model: ModelConfig = from_dict(ModelConfig, meta.get("model"), "model")
        except ConfigError as err:
            raise CheckpointError(f"{config_file}: {err}") from None
        origin, step = meta.get("base"), meta.get("step")
        self.base = origin if isinstance(origin, str) else None
        self.step = step if type(step) is int else None
        if base is not None:
            self.check_fits(base, base_name or "the base")
        self.weights = ShardedSafetensors(self.path, WEIGHTS_FILE.removesuffix(".safetensors"))
        shapes, self.table = canonical_layout(base or self.model, self.lora)
        self.shapes = {n: s for n, s in shapes.items() if is_adapter(n)}
        found = set(self.weights.names)
        if found != set(self.shapes):
            raise CheckpointError(f"{self.path / WEIGHTS_FILE}: the tensors do not fit the adapters its config "
                                  f"describes (missing {sorted(set(self.shapes) - found)[:2]}, unexpected "
                                  f"{sorted(found - set(self.shapes))[:2]})")
        for name, shape in self.shapes.items():
            if self.weights.shape(name) != tuple(shape):
                raise CheckpointError(f"{self.path / WEIGHTS_FILE}: {name} has shape {self.weights.shape(name)}, its "
                                      f"config says {tuple(shape)}")

    def check_fits(self, model: ModelConfig, base: str | Path) -> None:
        """One line when these adapters were made for a base of another shape than `model`."""
        fields = ("family", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "ffn_hidden", "tie_embeddings")
        wrong = [f for f in fields if getattr(model, f) != getattr(self.model, f)]
        if wrong:
            f = wrong[0]
            raise ConfigError(f"adapter {self.path} was trained on a base with model.{f}={getattr(self.model, f)}, "
                              f"{base} has model.{f}={getattr(model, f)}; load it onto the base it was trained on")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.weights.tensor(name).float() for name in self.shapes}
