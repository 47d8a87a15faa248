"""Canonical gptscale weights <-> Hugging Face transformers checkpoints, exactly.

gpt2-family models become `GPT2LMHeadModel`, llama-family models `LlamaForCausalLM`. The maps
are pure tensor plumbing (views, transposes, concatenations, slices: no arithmetic), so a round
trip is bitwise and an exported model computes the same logits as gptscale's.

Conventions:
- Canonical weights are the tp=1 model's parameters by name (`checkpoint.weights`), the
  vocabulary unpadded: the embedding and the untied head have exactly `vocab_size` rows.
- gptscale's fused QKV rows are grouped per key/value head g: [q heads of g.., k_g, v_g].
  Llama splits them into q_proj / k_proj / v_proj; GPT-2's c_attn is [q; k; v] over all heads.
- GPT-2's Conv1D layers (c_attn, c_proj, c_fc) store weights as [in, out]: transposed.
- HF GPT-2 always has biases: a bias-free gpt2 model exports zero biases (adding 0 is exact),
  and importing into a bias-free model requires them to be zero.
- Tied embeddings: `lm_head.weight` is never written (from_pretrained ties it); an HF state
  dict that has it must hold the embedding there.

Streaming: `hf_names(cfg)` says which HF tensors each canonical tensor becomes;
`tensor_to_hf` / `tensor_from_hf` convert one canonical tensor at a time, and the whole-dict
`to_hf` / `from_hf` are loops over them. Returned tensors own their (contiguous) memory, so
a dict can go straight to `safetensors.torch.save_file`.

Torch only: never imports transformers or deepspeed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from gptscale.config import ModelConfig
from gptscale.errors import CheckpointError, ConfigError
from gptscale.convert.tp import canonical_shapes

StateDict = dict[str, torch.Tensor]

# Canonical module -> HF module; "{i}" is the layer. Llama's attn.qkv is split in hf_targets.
_HF_MODULES = {
    "gpt2": {
        "embed": "transformer.wte", "pos_embed": "transformer.wpe", "norm_f": "transformer.ln_f",
        "head": "lm_head", "norm1": "transformer.h.{i}.ln_1", "norm2": "transformer.h.{i}.ln_2",
        "attn.qkv": "transformer.h.{i}.attn.c_attn", "attn.proj": "transformer.h.{i}.attn.c_proj",
        "mlp.up": "transformer.h.{i}.mlp.c_fc", "mlp.down": "transformer.h.{i}.mlp.c_proj",
    },
    "llama": {
        "embed": "model.embed_tokens", "norm_f": "model.norm", "head": "lm_head",
        "norm1": "model.layers.{i}.input_layernorm", "norm2": "model.layers.{i}.post_attention_layernorm",
        "attn.qkv": "model.layers.{i}.self_attn", "attn.proj": "model.layers.{i}.self_attn.o_proj",
        "mlp.up": "model.layers.{i}.mlp.up_proj", "mlp.gate": "model.layers.{i}.mlp.gate_proj",
        "mlp.down": "model.layers.{i}.mlp.down_proj",
    },
}
_GPT2_CONV1D = frozenset({"attn.qkv", "attn.proj", "mlp.up", "mlp.down"})
_GPT2_NO_BIAS = frozenset({"embed", "pos_embed", "head"})  # tables: no bias in HF either
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model."}
# Non-parameter buffers older checkpoints carry (causal masks, RoPE tables): safe to skip.
_IGNORED = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),
}
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# The GELU variants that are gptscale's F.gelu(approximate="tanh"); HF's "gelu" is the erf one.
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
# transformers' class defaults: save_pretrained leaves fields at these values out of config.json.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
        "tie_word_embeddings": True,
    },
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
    },
}


# -- configs ------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_id: int | None,
              dtype: str = "float32") -> dict[str, Any]:
    """The config.json of the HF model that computes what `cfg` computes, every field explicit;
    raises ConfigError for a model HF cannot express (GPT-2 with grouped-query attention)."""
    _check_exportable(cfg)
    for name, token in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if token is not None and not 0 <= token < cfg.vocab_size:
            raise ConfigError(f"{name}={token} is outside the vocabulary (model.vocab_size={cfg.vocab_size})")
    common = {
        "architectures": [_ARCHITECTURES[cfg.family]], "model_type": cfg.family,
        "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "dtype": dtype, "torch_dtype": dtype,  # transformers >= 5 reads dtype, 4.x torch_dtype
    }
    if cfg.family == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden,
                # Same kernel as gptscale's F.gelu(approximate="tanh"), so bitwise-equal activations.
                "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
    return {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            # transformers >= 5 reads rope_parameters, 4.x the top-level rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "attention_dropout": 0.0, "pretraining_tp": 1}


def hf_config_to_model_config(hf_cfg: Mapping[str, Any]) -> ModelConfig:
    """The gptscale model of an HF config.json (gpt2 or llama); raises ConfigError, naming the
    field, for any setting gptscale cannot compute exactly."""
    family = hf_cfg.get("model_type")
    if family not in _HF_DEFAULTS:
        raise ConfigError(f"Hugging Face config model_type={family!r} is not supported; gptscale converts "
                          f"{' and '.join(_HF_DEFAULTS)} models only")
    hf = {**_HF_DEFAULTS[family], **hf_cfg}
    return _gpt2_model_config(hf) if family == "gpt2" else _llama_model_config(hf)


def _gpt2_model_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "activation_function", _TANH_GELUS, "gptscale's GPT-2 MLP uses the tanh-approximated GELU")
    _require(hf, "scale_attn_weights", (True,), "gptscale scales attention scores by 1/sqrt(head size)")
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "gptscale has no per-layer attention scaling")
    _require(hf, "add_cross_attention", (False,), "gptscale is decoder-only")
    return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], n_kv_head=hf["n_head"],
                       ffn_hidden=hf["n_inner"] or 4 * hf["n_embd"], bias=True,
                       tie_embeddings=hf["tie_word_embeddings"], norm_eps=hf["layer_norm_epsilon"],
                       init_std=hf["initializer_range"])


def _llama_model_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "gptscale's Llama MLP is SwiGLU")
    n_head = hf["num_attention_heads"]
    _require(hf, "head_dim", (None, hf["hidden_size"] // n_head), "gptscale's head size is hidden_size/num_heads")
    _require(hf, "mlp_bias", (hf["attention_bias"],), "gptscale has one bias switch for attention and MLP, "
             f"and attention_bias={hf['attention_bias']}")
    # rope_parameters (transformers >= 5) or rope_scaling + rope_theta (4.x).
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"Hugging Face config rope_type={rope_type!r} is not supported: gptscale's RoPE is "
                          f"unscaled (rope_type 'default')")
    _require(rope, "partial_rotary_factor", (None, 1.0), "gptscale rotates whole heads")
    return ModelConfig(family="llama", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                       n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"],
                       n_kv_head=hf["num_key_value_heads"] or n_head, ffn_hidden=hf["intermediate_size"],
                       bias=hf["attention_bias"], tie_embeddings=hf["tie_word_embeddings"],
                       norm_eps=hf["rms_norm_eps"], rope_theta=rope.get("rope_theta", hf["rope_theta"]),
                       init_std=hf["initializer_range"])


def _require(hf: Mapping[str, Any], key: str, allowed: tuple, why: str) -> None:
    if hf.get(key) not in allowed:
        raise ConfigError(f"Hugging Face config {key}={hf.get(key)!r} is not supported: {why}")


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.family == "gpt2" and cfg.n_kv_head != cfg.n_head:
        raise ConfigError(f"model.n_kv_head={cfg.n_kv_head} differs from model.n_head={cfg.n_head}: Hugging Face "
                          f"GPT-2 has no grouped-query attention; use the llama family or n_kv_head=n_head")


# -- names and shapes ---------------------------------------------------------------------
def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Canonical name -> the HF tensors it becomes (and is rebuilt from), in model order."""
    return {name: hf_targets(name, cfg) for name in canonical_shapes(cfg)}


def hf_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """HF name -> shape of every tensor `to_hf` writes for `cfg`."""
    shapes = {}
    for name, shape in canonical_shapes(cfg).items():
        for hf_name, t in tensor_to_hf(name, torch.empty(shape, device="meta"), cfg).items():
            shapes[hf_name] = t.shape
    return shapes


def _parse(name: str) -> tuple[int | None, str, str]:
    """Canonical name -> (layer or None, module, weight|bias)."""
    if name == "pos_embed":  # a bare Parameter, HF's wpe.weight
        return None, name, "weight"
    module, kind = name.rsplit(".", 1)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match:
        return int(match[1]), match[2], kind
    return None, module, kind


def hf_targets(name: str, cfg: ModelConfig) -> tuple[str, ...]:
    _check_exportable(cfg)
    layer, module, kind = _parse(name)
    if module not in _HF_MODULES[cfg.family]:
        raise CheckpointError(f"canonical weight {name!r} has no Hugging Face {cfg.family} counterpart")
    prefix = _HF_MODULES[cfg.family][module].format(i=layer)
    if cfg.family == "llama" and module == "attn.qkv":
        return tuple(f"{prefix}.{p}_proj.{kind}" for p in "qkv")
    if cfg.family == "gpt2" and not cfg.bias and module not in _GPT2_NO_BIAS:
        return f"{prefix}.{kind}", f"{prefix}.bias"  # the zero bias rides with its weight
    return (f"{prefix}.{kind}",)


# -- one tensor at a time -----------------------------------------------------------------
def tensor_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> StateDict:
    """One canonical tensor -> its HF tensors (names as in `hf_names(cfg)[name]`)."""
    targets = hf_targets(name, cfg)
    _, module, kind = _parse(name)
    parts = [tensor]
    if module == "attn.qkv":
        q, k, v = split_qkv(tensor, cfg)
        parts = [q, k, v] if cfg.family == "llama" else [torch.cat([q, k, v])]
    if cfg.family == "gpt2" and module in _GPT2_CONV1D and kind == "weight":
        parts = [p.t() for p in parts]
    if len(targets) > len(parts):  # bias-free gpt2: HF needs a bias, zero is exact
        parts.append(tensor.new_zeros(tensor.shape[0]))
    return {t: p.clone(memory_format=torch.contiguous_format) for t, p in zip(targets, parts, strict=True)}


def tensor_from_hf(name: str, hf_tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """One canonical tensor, rebuilt from the HF tensors `hf_names(cfg)[name]` (any mapping that
    has them, e.g. a lazy reader of a safetensors file)."""
    targets = hf_targets(name, cfg)
    _, module, kind = _parse(name)
    parts = [hf_tensors[t] for t in targets]
    if cfg.family == "gpt2" and not cfg.bias and module not in _GPT2_NO_BIAS:
        if torch.count_nonzero(parts.pop()):
            raise CheckpointError(f"{targets[-1]} is not zero, and model.bias=false cannot hold it; "
                                  f"convert with model.bias=true")
    if cfg.family == "gpt2" and module in _GPT2_CONV1D and kind == "weight":
        parts = [p.t() for p in parts]
    if module == "attn.qkv":
        if cfg.family == "gpt2":
            parts = torch.split(parts[0], [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                                           cfg.n_kv_head * cfg.head_dim])
        parts = [_merge_qkv(*parts, cfg)]
    return parts[0].clone(memory_format=torch.contiguous_format)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows grouped per kv head -> (q, k, v) rows, each head-major (HF's order)."""
    per_kv = cfg.n_head // cfg.n_kv_head
    groups = qkv.view(cfg.n_kv_head, per_kv + 2, cfg.head_dim, *qkv.shape[1:])
    q = groups[:, :per_kv].reshape(cfg.n_head * cfg.head_dim, *qkv.shape[1:])
    k = groups[:, per_kv].reshape(cfg.n_kv_head * cfg.head_dim, *qkv.shape[1:])
    v = groups[:, per_kv + 1].reshape(cfg.n_kv_head * cfg.head_dim, *qkv.shape[1:])
    return q, k, v


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    per_kv, rest = cfg.n_head // cfg.n_kv_head, q.shape[1:]
    groups = torch.cat([q.reshape(cfg.n_kv_head, per_kv, cfg.head_dim, *rest),
                        k.reshape(cfg.n_kv_head, 1, cfg.head_dim, *rest),
                        v.reshape(cfg.n_kv_head, 1, cfg.head_dim, *rest)], dim=1)
    return groups.reshape((cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, *rest)


# -- whole state dicts --------------------------------------------------------------------
def to_hf(canonical: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """Canonical weights -> the HF state dict from_pretrained needs (no tied lm_head.weight)."""
    expected = canonical_shapes(cfg)
    _check_names("canonical weights", set(canonical), set(expected))
    out: StateDict = {}
    for name, shape in expected.items():
        if canonical[name].shape != shape:
            raise CheckpointError(f"canonical weight {name} has shape {tuple(canonical[name].shape)}, "
                                  f"the model expects {tuple(shape)}")
        out.update(tensor_to_hf(name, canonical[name], cfg))
    return out


def from_hf(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """An HF state dict (GPT2LMHeadModel / LlamaForCausalLM, or their base models' keys) ->
    canonical weights."""
    hf_state = _normalize(hf_state, cfg)
    expected = hf_shapes(cfg)
    _check_names("Hugging Face weights", set(hf_state), set(expected))
    for name, shape in expected.items():
        if hf_state[name].shape != shape:
            raise CheckpointError(f"Hugging Face weight {name} has shape {tuple(hf_state[name].shape)}, "
                                  f"the model expects {tuple(shape)}")
    return {name: tensor_from_hf(name, hf_state, cfg) for name in canonical_shapes(cfg)}


def _normalize(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Drop known buffers and a tied lm_head (checked), add the base-model prefix if absent."""
    prefix = _BASE_PREFIX[cfg.family]
    state = {k: v for k, v in hf_state.items() if not _IGNORED[cfg.family].search(k)}
    if not any(k.startswith(prefix) for k in state):  # a bare GPT2Model / LlamaModel checkpoint
        state = {k if k == "lm_head.weight" else prefix + k: v for k, v in state.items()}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        embed = _HF_MODULES[cfg.family]["embed"] + ".weight"
        head = state.pop("lm_head.weight")
        if embed in state and not torch.equal(head, state[embed]):
            raise CheckpointError(f"lm_head.weight differs from {embed}, but model.tie_embeddings=true; "
                                  f"convert with model.tie_embeddings=false")
    return state


def _check_names(what: str, have: set[str], want: set[str]) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise CheckpointError(f"{what} do not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
