"""The canonical folder: one model's weights independent of any run layout, the form every
conversion goes through (`gptscale convert consolidate` writes it; `train.init_from`,
`generate` and `convert to-hf` read it).

    OUT/
      config.yaml                    the resolved run config (the model section is the shape)
      model.safetensors              TP-merged, unpadded tensors under the dense model's names
        (or model-0000i-of-0000N.safetensors + model.safetensors.index.json)
      tokenizer/                     the run's tokenizer, if it had one
      optimizer*.safetensors         --with-optimizer: fp32 "master.NAME", "exp_avg.NAME",
                                     "exp_avg_sq.NAME" (Adam's moments, canonical layout too)
      trainer_state.json             --with-optimizer: step, the layout it was saved at, run id

A source is anything with `cfg`, `names`, `shapes`, `tokenizer_dir` and `tensor(name, kind)`:
a training checkpoint (checkpoint/read.py), a canonical folder, a Hugging Face folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Protocol

import torch
import yaml

from gptscale import config
from gptscale.atomic import staged_folder
from gptscale.checkpoint.layout import CONFIG, TOKENIZER, Layout
from gptscale.checkpoint.sharded import DEFAULT_SHARD_BYTES, Entry, ShardedSafetensors, write_sharded
from gptscale.config import RunConfig
from gptscale.convert.tp import canonical_layout
from gptscale.errors import CheckpointError

FORMAT = "gptscale-canonical-1"
MOMENTS = ("exp_avg", "exp_avg_sq")
TRAINER_STATE = "trainer_state.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Source(Protocol):
    cfg: RunConfig

    @property
    def names(self) -> list[str]: ...

    shapes: dict[str, torch.Size]
    tokenizer_dir: Path | None

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor: ...

    # Sources stored as safetensors also have tensor_slice(name, index): `index` of the weights
    # alone, read without the rest (checkpoint.weights.tp_piece uses it where it exists).


def is_canonical(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and ((folder / "model.safetensors").is_file()
                                            or (folder / "model.safetensors.index.json").is_file())


class CanonicalFolder:
    """A folder written by `write_canonical`, read tensor by tensor (or slice by slice)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_canonical(self.path):
            raise CheckpointError(f"{self.path} is not a canonical gptscale folder (needs {CONFIG} and "
                                  f"model.safetensors or its index); write one with 'gptscale convert consolidate'")
        self.cfg = config.load(self.path / CONFIG)
        self.weights = ShardedSafetensors(self.path, "model")
        if self.weights.metadata.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}: its safetensors are not marked {FORMAT!r}; for a Hugging Face folder "
                                  f"use 'gptscale convert from-hf' first")
        self.shapes, self.table = canonical_layout(self.cfg.model, self.cfg.lora)
        found, expected = set(self.weights.names), set(self.shapes)
        if found != expected:
            raise CheckpointError(f"{self.path}: the weights do not fit the model in {CONFIG} (missing "
                                  f"{sorted(expected - found)[:2]}, unexpected {sorted(found - expected)[:2]})")
        for name, shape in self.shapes.items():
            if self.weights.shape(name) != tuple(shape):
                raise CheckpointError(f"{self.path}: {name} has shape {self.weights.shape(name)}, the model in "
                                      f"{CONFIG} needs {tuple(shape)}; the config does not match the weights")
        self.tokenizer_dir = self.path / TOKENIZER if (self.path / TOKENIZER).is_dir() else None
        self._optimizer: ShardedSafetensors | None = None

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def has_optimizer(self) -> bool:
        return (self.path / TRAINER_STATE).is_file()

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The weights ("fp32": as fp32, "weights": as stored) or fp32 optimizer state
        ("master", "exp_avg", "exp_avg_sq")."""
        if kind in ("fp32", "weights"):
            stored = self.weights.tensor(name)
            return stored if kind == "weights" else stored.float()
        self.trainer_state()  # there is optimizer state
        if self._optimizer is None:
            self._optimizer = ShardedSafetensors(self.path, "optimizer")
        key = f"{kind}.{name}"
        if key not in self._optimizer.stored and kind == "master":  # fp32 weights are not stored twice
            return self.weights.tensor(name).float()
        return self._optimizer.tensor(key)

    def tensor_slice(self, name: str, index: tuple | None) -> torch.Tensor:
        return self.weights.slice(name, index)

    def trainer_state(self) -> dict:
        if not self.has_optimizer:
            raise CheckpointError(f"{self.path} holds no optimizer state (consolidate with --with-optimizer)")
        path = self.path / TRAINER_STATE
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise TypeError("not a JSON object")
            for key in ("step", "adam_step"):
                if type(state.get(key)) is not int or state[key] < 0:
                    raise TypeError(f"{key!r} is not an integer >= 0")
            layout = Layout.from_json(state.get("layout"), path)
            data = state.get("data")
            if not isinstance(data, list) or len(data) != layout.world_size or not isinstance(state.get("run_id"), str):
                raise TypeError(f"'data' is not one loader state per rank of {layout.to_json()}, or no 'run_id'")
            return state
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None


def write_canonical(source: Source, out: str | Path, dtype: str = "fp32", with_optimizer: bool = False,
                    trainer_state: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    progress: Callable[[int], None] | None = None) -> Path:
    """`source` as a canonical folder `out` (staged, renamed into place when complete)."""
    out = Path(out)
    target = DTYPES[dtype]
    with staged_folder(out) as staging:
        (staging / CONFIG).write_text(yaml.safe_dump(source.cfg.to_dict(), sort_keys=False))
        entries = [Entry(name, tuple(source.shapes[name]), target) for name in source.names]
        write_sharded(staging, "model", entries, lambda name: source.tensor(name).to(target), max_shard_bytes,
                      {"format": FORMAT, "dtype": dtype}, progress)
        if with_optimizer:
            # The master weights are stored apart only when the weights are not fp32 already.
            kinds = [*(["master"] if target != torch.float32 else []), *MOMENTS]
            entries = [Entry(f"{k}.{n}", tuple(source.shapes[n]), torch.float32) for n in source.names for k in kinds]

            def produce(key: str) -> torch.Tensor:
                kind, name = key.split(".", 1)
                return source.tensor(name, kind)

            write_sharded(staging, "optimizer", entries, produce, max_shard_bytes, {"format": FORMAT}, progress)
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state or {}, indent=2) + "\n")
        if source.tokenizer_dir is not None:
            shutil.copytree(source.tokenizer_dir, staging / TOKENIZER,
                            ignore=lambda d, names: [n for n in names if not n.endswith(".json")])
    return out


class CanonicalFile:
    """One safetensors file of canonical weights (as `checkpoint.weights.save_canonical`
    writes), for a model whose config the caller knows."""

    tokenizer_dir = None

    def __init__(self, path: Path, model_cfg):
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: a weights file must be .safetensors (a pickle could run code)")
        self.weights = ShardedSafetensors(path.parent, path.name.removesuffix(".safetensors"))
        self.shapes = {name: torch.Size(self.weights.shape(name)) for name in self.weights.names}
        self.cfg = None
        self.model_cfg = model_cfg

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        if kind != "fp32":
            raise CheckpointError(f"{self.weights.folder}: a weights file holds no optimizer state")
        return self.weights.tensor(name).float()

    def tensor_slice(self, name: str, index: tuple | None) -> torch.Tensor:
        return self.weights.slice(name, index)
