"""Exact-match accuracy of greedy answers: does the model, given a held-out prompt, produce the
reference answer (up to surrounding whitespace) before its end-of-turn token?"""
from __future__ import annotations

import torch

from gptscale.model.generate import generate


def exact_match(model, examples: list[tuple[list[int], str]], tokenizer, max_new_tokens: int,
                device) -> tuple[float, list[tuple[str, str, str]]]:
    """(fraction answered exactly, [(prompt, reference, answer)] per example). Every rank of the
    model's TP group (and, under ZeRO-3, of its DP group) runs this together."""
    rows = []
    for prompt_ids, reference in examples:
        budget = min(max_new_tokens, model.cfg.block_size - len(prompt_ids))
        out = generate(model, torch.tensor([prompt_ids], device=device), budget, temperature=0.0,
                       stop_token=tokenizer.eos_id)[0, len(prompt_ids):].tolist()
        if tokenizer.eos_id in out:
            out = out[:out.index(tokenizer.eos_id)]
        rows.append((tokenizer.decode(prompt_ids), reference, tokenizer.decode(out)))
    hits = sum(answer.strip() == reference.strip() for _, reference, answer in rows)
    return hits / max(len(rows), 1), rows
