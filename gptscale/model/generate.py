"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k).

TP-aware: every rank of a TP group runs the same loop on its heads; logits are gathered
to the full vocabulary and the token chosen by TP rank 0 is broadcast, so the ranks stay
in lock-step even when their random generators differ.
"""
from __future__ import annotations

import torch

from gptscale.model.gpt import GPT
from gptscale.parallel.primitives import broadcast_from_tp_rank0


def pick_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids. temperature == 0 means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """Continue `prompt` (B, T0) by up to `max_new_tokens`; returns (B, T0 + n).

    Stops early once every sequence has produced `stop_token`.
    """
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.block_size={model.cfg.block_size}")
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(prompt.shape[0], total)
    tokens = [prompt]
    done = torch.zeros(prompt.shape[0], 1, dtype=torch.bool, device=prompt.device)
    next_input = prompt
    for _ in range(max_new_tokens):
        logits = model.full_logits(model(next_input, cache=cache))[:, -1]  # (B, V)
        next_input = pick_next_token(logits, temperature=temperature, top_k=top_k, generator=generator)
        next_input = broadcast_from_tp_rank0(next_input, model.tp)
        tokens.append(next_input)
        if stop_token is not None:
            done |= next_input == stop_token
            if done.all():
                break
    model.train(was_training)
    return torch.cat(tokens, dim=1)
