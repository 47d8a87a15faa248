"""Hugging Face model folders in and out, tensor by tensor (the maps are convert/hf.py's).

`write_hf` turns any source (a training checkpoint, a canonical folder) into a folder that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline:
config.json with every field explicit, generation_config.json, sharded safetensors, and the
run's tokenizer files. `HFFolder` reads a local GPT-2 or Llama folder as a source of
canonical tensors (safetensors only: a pickled pytorch_model.bin could run code).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from gptscale.atomic import staged_folder
from gptscale.checkpoint.canonical import DTYPES, Source
from gptscale.checkpoint.sharded import DEFAULT_SHARD_BYTES, Entry, ShardedSafetensors, write_sharded
from gptscale.config import RunConfig
from gptscale.convert.hf import hf_config, hf_config_to_model_config, hf_names, hf_shapes, tensor_from_hf, tensor_to_hf
from gptscale.convert.tp import canonical_layout
from gptscale.errors import CheckpointError, ConfigError, UserError
from gptscale.typed import from_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def write_hf(source: Source, out: str | Path, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: Callable[[int], None] | None = None) -> Path:
    """`source` as a transformers folder `out` (staged, renamed into place when complete)."""
    from gptscale.data.tokenizer import TextTokenizer

    model_cfg, target = source.cfg.model, DTYPES[dtype]
    tok = TextTokenizer.load(source.tokenizer_dir) if source.tokenizer_dir is not None else None
    settings = hf_config(model_cfg, tok.bos_id if tok else None, tok.eos_id if tok else None, HF_DTYPE_NAMES[dtype])
    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}; "
                          f"the checkpoint and its tokenizer do not belong together")
    names, shapes = hf_names(model_cfg), hf_shapes(model_cfg)
    owner = {hf: name for name, targets in names.items() for hf in targets}
    entries = [Entry(hf, tuple(shapes[hf]), target) for targets in names.values() for hf in targets]
    pending: dict[str, torch.Tensor] = {}  # the HF tensors of the canonical tensor being written

    def produce(hf: str) -> torch.Tensor:
        if hf not in pending:
            pending.clear()
            pending.update(tensor_to_hf(owner[hf], source.tensor(owner[hf]), model_cfg))
        return pending.pop(hf).to(target)

    with staged_folder(out) as staging:
        write_sharded(staging, "model", entries, produce, max_shard_bytes, {"format": "pt"}, progress)
        (staging / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
        generation = {"bos_token_id": settings["bos_token_id"], "eos_token_id": settings["eos_token_id"],
                      "pad_token_id": tok.pad_id if tok else None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tok is not None:
            for name in TOKENIZER_FILES:
                if (source.tokenizer_dir / name).is_file():
                    shutil.copyfile(source.tokenizer_dir / name, staging / name)
    return Path(out)


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


class HFFolder:
    """A local transformers GPT-2 / Llama folder as canonical tensors (fp32 or as stored)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        settings = self._read_config(self.path / "config.json")
        try:
            model_cfg = hf_config_to_model_config(settings)
            # The model section is the folder's; the rest are defaults (which fit any model).
            self.cfg: RunConfig = from_dict(RunConfig, {"model": dataclasses.asdict(model_cfg)})
        except UserError as err:
            raise CheckpointError(f"{self.path / 'config.json'}: {err}") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.path / 'config.json'}: a field has the wrong type or value "
                                  f"({type(exc).__name__}: {exc})") from None
        if not any((self.path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            pickled = sorted(p.name for p in self.path.glob("*.bin"))
            why = (f" (only {pickled[0]}: a pickle, which could run code, is refused; re-save the model with "
                   f"safe_serialization=True)") if pickled else ""
            raise CheckpointError(f"{self.path} holds no model.safetensors{why}")
        self.weights = ShardedSafetensors(self.path, "model")
        self.shapes, self.table = canonical_layout(self.cfg.model)
        self._prefix = self._check_names()
        self.tokenizer_dir = self.path if (self.path / "tokenizer.json").is_file() else None

    @staticmethod
    def _read_config(path: Path) -> dict:
        try:
            settings = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({type(exc).__name__}); the folder is damaged") from None
        if not isinstance(settings, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return settings

    def _check_names(self) -> str:
        """The prefix the file's names lack (a bare GPT2Model / LlamaModel saves none), after
        checking that every tensor the model needs is there with its shape."""
        model_cfg = self.cfg.model
        expected = hf_shapes(model_cfg)
        base = "transformer." if model_cfg.family == "gpt2" else "model."
        have = set(self.weights.names)
        prefix = "" if any(n.startswith(base) for n in have) else base
        for name, shape in expected.items():
            stored = name if name == "lm_head.weight" else name.removeprefix(prefix)
            if stored not in have:
                raise CheckpointError(f"{self.path}: the weights lack {stored} that a {model_cfg.family} model of "
                                      f"this config.json needs; the folder is incomplete or of another model")
            if self.weights.shape(stored) != tuple(shape):
                raise CheckpointError(f"{self.path}: {stored} has shape {self.weights.shape(stored)}, config.json "
                                      f"implies {tuple(shape)}")
        if model_cfg.tie_embeddings and "lm_head.weight" in have:
            embed = next(n for n in expected if n.endswith(("wte.weight", "embed_tokens.weight"))).removeprefix(prefix)
            if not torch.equal(self.weights.tensor("lm_head.weight"), self.weights.tensor(embed)):
                raise CheckpointError(f"{self.path}: lm_head.weight differs from {embed} but config.json ties them "
                                      f"(tie_word_embeddings=true)")
        return prefix

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def trainer_state(self) -> dict:
        raise CheckpointError(f"{self.path} is a Hugging Face model folder: it holds no optimizer state")

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        if kind != "fp32":
            self.trainer_state()
        return tensor_from_hf(name, self, self.cfg.model).float()

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        """One stored Hugging Face tensor by its full name (what tensor_from_hf asks for)."""
        return self.weights.tensor(hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix(self._prefix))
