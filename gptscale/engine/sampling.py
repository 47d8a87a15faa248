"""`gptscale generate`: text from a training checkpoint, in one process."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from gptscale.config import ConfigError
from gptscale.convert.tp import split_tp
from gptscale.data.shards import matching_tokenizer, read_manifest
from gptscale.data.tokenizer import TextTokenizer
from gptscale.engine.consolidate import consolidate
from gptscale.model.generate import generate
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import split_table


def generate_from_checkpoint(checkpoint: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                             top_k: int | None = 50, seed: int = 0, tokenizer: str | None = None) -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every file it reads
        cfg, weights = consolidate(checkpoint)
    if tokenizer is not None:
        tok = TextTokenizer.load(tokenizer)
    elif cfg.data.path is not None:
        tok = matching_tokenizer(cfg.data.path, read_manifest(cfg.data.path))
    else:
        raise ConfigError("the checkpoint was trained on synthetic data; pass --tokenizer")
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(weights, split_table(model), 1, model.padded_vocab)[0])
    ids = tok.encode(prompt)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens; give some text")
    budget = min(max_new_tokens, cfg.model.block_size - len(ids))
    out = generate(model, torch.tensor([ids]), budget, temperature=temperature, top_k=top_k,
                   generator=torch.Generator().manual_seed(seed), stop_token=tok.eos_id)
    return tok.decode(out[0].tolist())
