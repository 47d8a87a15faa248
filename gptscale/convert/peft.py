"""Canonical gptscale LoRA adapters -> a PEFT (Hugging Face `peft`) LoRA adapter folder, exactly.

The adapter folder (`adapter_model.safetensors` + `adapter_config.json`) loads with
`peft.PeftModel.from_pretrained` onto the base model that `convert.hf.to_hf` exports, and the
pair computes what gptscale's adapted model computes. Like `convert.hf`, the map is pure tensor
plumbing (slices, concatenations: no arithmetic), so nothing is rounded on the way.

Conventions:
- The adapter of the base linear at canonical path M (weight (out, in)) is `M.lora_A.weight`
  (r, in) and `M.lora_B.weight` (out, r); the adapted layer computes W x + b + (alpha/r) B (A x).
  B's rows are in the order of M.weight's rows: grouped per key/value head for `attn.qkv`,
  `vocab_size` rows (unpadded) for `head`.
- Targets are short names: qkv, proj, up, gate (llama only), down, head (an untied head only),
  and mlp = every MLP linear of the family.
- PEFT file keys are `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, without
  the adapter name (PEFT inserts it when loading).
- PEFT's LoRA on GPT-2's Conv1D is nn.Linear(in, r) then nn.Linear(r, out), as on nn.Linear:
  the base Conv1D weight is stored transposed, the adapters are not (fan_in_fan_out only
  transposes B @ A when PEFT merges).
- The fused QKV adapter: A x is shared by q, k and v, so Llama's q_proj / k_proj / v_proj each
  get the whole A and their rows of B; GPT-2's c_attn gets A and B's rows reordered to
  [q; k; v], exactly as the base weight's rows are (`convert.hf.split_qkv`).
- Returned tensors own their (contiguous) memory: a dict goes straight to
  `safetensors.torch.save_file`.

Torch only: never imports transformers, peft or deepspeed.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gptscale.config import LoRAConfig, ModelConfig
from gptscale.convert.hf import split_qkv, hf_targets
from gptscale.convert.tp import canonical_layout
from gptscale.errors import CheckpointError, ConfigError
from gptscale.parallel.lora import is_adapter

StateDict = dict[str, torch.Tensor]

_A, _B = "lora_A.weight", "lora_B.weight"
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model


# -- targets: which linears are adapted is the adapted model's own answer (parallel.lora) -----
def _as_text(targets: Sequence[str] | str) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def adapter_shapes(cfg: ModelConfig, r: int, targets: Sequence[str] | str) -> dict[str, torch.Size]:
    """Canonical adapter name -> shape, for every adapted linear of every block, in model order
    (read off the adapted model on the meta device; a target naming nothing is a ConfigError)."""
    shapes, _ = canonical_layout(cfg, LoRAConfig(rank=r, targets=_as_text(targets)))
    return {name: shape for name, shape in shapes.items() if is_adapter(name)}


def _base_modules(cfg: ModelConfig, targets: Sequence[str] | str) -> list[str]:
    """Canonical path of every adapted linear, in model order."""
    return list(dict.fromkeys(name.rsplit(".", 2)[0] for name in adapter_shapes(cfg, 1, targets)))


def _hf_modules(module: str, cfg: ModelConfig) -> tuple[str, ...]:
    """Canonical module path -> the HF module path(s) holding its weight (llama qkv: q, k, v)."""
    # hf_targets names the weights (and, for bias-free gpt2, a zero bias riding along).
    return tuple(t.removesuffix(".weight") for t in hf_targets(f"{module}.weight", cfg) if t.endswith(".weight"))


def peft_target_modules(cfg: ModelConfig, targets: Sequence[str] | str) -> list[str]:
    """PEFT `target_modules` for the targets: module-name suffixes qualified enough that GPT-2's
    two c_proj (attn, mlp) stay apart. PEFT adapts a module whose name equals an entry or ends
    with "." + entry."""
    suffixes: dict[str, None] = {}
    for module in _base_modules(cfg, targets):
        for path in _hf_modules(module, cfg):
            # Drop the layer prefix: transformer.h.0.attn.c_attn -> attn.c_attn; lm_head stays.
            suffixes[re.sub(r"^.*?\.\d+\.", "", path)] = None
    return list(suffixes)


def _check_rank(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"lora rank r={r!r} must be a positive integer")


# -- export -------------------------------------------------------------------------------
def adapter_to_peft(adapters: Mapping[str, torch.Tensor], cfg: ModelConfig, *, r: int, alpha: float,
                    dropout: float, targets: Sequence[str] | str,
                    base_model: str | None) -> tuple[StateDict, dict[str, Any]]:
    """Canonical adapters -> (adapter_model.safetensors tensors, adapter_config.json dict).
    `base_model`: the base's name or path for the config (None: the user passes the model)."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora alpha={alpha!r} must be a positive number")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout={dropout!r} must be in [0, 1)")
    expected = adapter_shapes(cfg, r, targets)
    _check_adapters(adapters, expected, cfg, r)

    tensors: StateDict = {}
    for module in dict.fromkeys(name.rsplit(".", 2)[0] for name in expected):
        a, b = adapters[f"{module}.{_A}"], adapters[f"{module}.{_B}"]
        paths = _hf_modules(module, cfg)
        bs = [b]
        if module.endswith("attn.qkv"):
            q, k, v = split_qkv(b, cfg)  # B's rows are output rows: split like the base weight
            bs = [q, k, v] if cfg.family == "llama" else [torch.cat([q, k, v])]
        for path, b_part in zip(paths, bs, strict=True):
            # Every part gets the whole A: the q, k and v rows all read the same A x.
            tensors[f"{_PEFT_PREFIX}{path}.{_A}"] = a.clone(memory_format=torch.contiguous_format)
            tensors[f"{_PEFT_PREFIX}{path}.{_B}"] = b_part.clone(memory_format=torch.contiguous_format)
    return tensors, _peft_config(cfg, r, alpha, dropout, targets, base_model)


def _peft_config(cfg: ModelConfig, r: int, alpha: float, dropout: float, targets: Sequence[str] | str,
                 base_model: str | None) -> dict[str, Any]:
    """adapter_config.json: what LoraConfig needs, plus every field that changes the computation
    pinned to plain LoRA (scaling alpha/r, no DoRA, no adapter bias); only fields that older
    PEFT versions also know, since those refuse unknown ones."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout, "target_modules": peft_target_modules(cfg, targets), "bias": "none",
        # GPT-2's linears are Conv1D ([in, out] weights). PEFT sets it per module anyway (warning
        # when it disagrees, e.g. for GPT-2's nn.Linear lm_head), and only uses it to merge.
        "fan_in_fan_out": cfg.family == "gpt2",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def _check_adapters(adapters: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                    cfg: ModelConfig, r: int) -> None:
    """One line naming the first tensor that is missing, unexpected or of the wrong shape."""
    model = f"a {cfg.family} model (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}) with lora rank {r}"
    missing = [n for n in expected if n not in adapters]
    if missing:
        raise CheckpointError(f"adapter tensor {missing[0]} is missing ({len(missing)} missing in all); {model} "
                              f"expects it with shape {tuple(expected[missing[0]])}")
    extra = [n for n in adapters if n not in expected]
    if extra:
        found = getattr(adapters[extra[0]], "shape", None)
        raise CheckpointError(f"adapter tensor {extra[0]} (shape {tuple(found) if found is not None else '?'}) "
                              f"is not expected ({len(extra)} unexpected in all); {model} and these targets "
                              f"expect no such tensor")
    for name, shape in expected.items():
        if adapters[name].shape != shape:
            raise CheckpointError(f"adapter tensor {name} has shape {tuple(adapters[name].shape)}, "
                                  f"{model} expects {tuple(shape)}")


# -- merge --------------------------------------------------------------------------------
def merge_adapter(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], *, r: int,
                  alpha: float) -> StateDict:
    """Canonical base weights with every adapter folded in: W + (alpha/r) B @ A, computed in fp32
    and stored in W's dtype. Weights without an adapter are returned as they are (not copied)."""
    _check_rank(r)
    modules: dict[str, None] = {}
    for name in adapters:
        if not name.endswith((f".{_A}", f".{_B}")):
            raise CheckpointError(f"adapter tensor {name} is no lora_A.weight / lora_B.weight; adapters are named "
                                  f"<module>.{_A} and <module>.{_B}")
        modules[name.rsplit(".", 2)[0]] = None
    merged = dict(base)
    for module in modules:
        weight_name = f"{module}.weight"
        if weight_name not in base:
            raise CheckpointError(f"adapter of {module} has no base weight {weight_name} to merge into")
        w = base[weight_name]
        out_features, in_features = w.shape
        want = {f"{module}.{_A}": (r, in_features), f"{module}.{_B}": (out_features, r)}
        for name, shape in want.items():
            if name not in adapters:
                raise CheckpointError(f"adapter tensor {name} is missing; {weight_name} {tuple(w.shape)} with "
                                      f"lora rank {r} expects it with shape {shape}")
            if tuple(adapters[name].shape) != shape:
                raise CheckpointError(f"adapter tensor {name} has shape {tuple(adapters[name].shape)}, "
                                      f"{weight_name} {tuple(w.shape)} with lora rank {r} expects {shape}")
        merged[weight_name] = merged_weight(w, adapters[f"{module}.{_A}"], adapters[f"{module}.{_B}"], alpha / r)
    return merged


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32, in W's dtype."""
    return torch.addmm(weight.to(torch.float32), b.to(torch.float32), a.to(torch.float32), alpha=scaling).to(weight.dtype)
