"""Named model shapes, from CPU-test size to ~1T parameters.

The published shapes are kept exactly so that `count_parameters` can be checked against
the numbers their authors report (GPT-2 124M = 124,439,808; Llama-2-7B = 6,738,415,616 ...).
Shapes only (plain dicts): `ModelConfig.from_preset(name)` turns one into a checked config.
"""
from __future__ import annotations

from typing import Any

from gptscale.errors import ConfigError

_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: a few hundred thousand parameters, trains in minutes on 2 cores.
    "tiny": dict(family="gpt2", vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "tiny-llama": dict(family="llama", vocab_size=4096, block_size=256, n_layer=4, n_head=8,
                       n_kv_head=4, n_embd=128, ffn_hidden=352),
    # GPT-2 family (Radford et al. 2019) and GPT-3 XL's shape (Brown et al. 2020).
    "gpt2-124m": dict(family="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(family="gpt2", vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(family="gpt2", vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.3b": dict(family="gpt2", vocab_size=50257, block_size=2048, n_layer=24, n_head=16, n_embd=2048),
    # Llama family: Llama-3.2-1B (tied embeddings), Llama-2-7B, Llama-2-70B, Llama-3.1-405B.
    "llama-1b": dict(family="llama", vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8,
                     n_embd=2048, ffn_hidden=8192, tie_embeddings=True, rope_theta=500000.0),
    "llama-7b": dict(family="llama", vocab_size=32000, block_size=4096, n_layer=32, n_head=32,
                     n_embd=4096, ffn_hidden=11008),
    "llama-70b": dict(family="llama", vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_kv_head=8,
                      n_embd=8192, ffn_hidden=28672),
    "llama-405b": dict(family="llama", vocab_size=128256, block_size=8192, n_layer=126, n_head=128, n_kv_head=8,
                       n_embd=16384, ffn_hidden=53248, rope_theta=500000.0),
    # GPT-3 175B (Brown et al. 2020) as Megatron-LM trains it (vocabulary padded to 51,200;
    # Narayanan et al. 2021, Table 1: 174.6B parameters), and the 1T shape of the same table.
    "gpt3-175b": dict(family="gpt2", vocab_size=51200, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
    "gpt-1t": dict(family="gpt2", vocab_size=51200, block_size=2048, n_layer=128, n_head=160, n_embd=25600),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def preset_dict(name: str) -> dict[str, Any]:
    if name not in _PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {', '.join(_PRESETS)}")
    return dict(_PRESETS[name])

