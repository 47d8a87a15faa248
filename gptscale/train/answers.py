"""Exact-match accuracy of greedy answers: does the model, given a held-out prompt, produce the
reference answer (up to surrounding whitespace) before its end-of-turn token?"""
from __future__ import annotations

from collections import defaultdict

import torch

from gptscale.model.generate import generate

BATCH = 64  # prompts answered together (of one length: no padding, so no attention mask needed)


def exact_match(model, examples: list[tuple[list[int], str]], tokenizer, max_new_tokens: int,
                device) -> tuple[float, list[tuple[str, str, str]]]:
    """(fraction answered exactly, [(prompt, reference, answer)] per example, in order). Every
    rank of the model's TP group (and, under ZeRO-3, of its DP group) runs this together."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, (prompt_ids, _) in enumerate(examples):
        by_length[len(prompt_ids)].append(index)
    answers: dict[int, list[int]] = {}
    for length, indices in sorted(by_length.items()):
        budget = min(max_new_tokens, model.cfg.block_size - length)
        for start in range(0, len(indices), BATCH):
            batch = indices[start:start + BATCH]
            prompts = torch.tensor([examples[i][0] for i in batch], device=device)
            out = generate(model, prompts, budget, temperature=0.0, stop_token=tokenizer.eos_id)[:, length:]
            for i, row in zip(batch, out.tolist()):
                answers[i] = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
    rows = [(tokenizer.decode(prompt_ids), reference, tokenizer.decode(answers[i]))
            for i, (prompt_ids, reference) in enumerate(examples)]
    hits = sum(answer.strip() == reference.strip() for _, reference, answer in rows)
    return hits / max(len(rows), 1), rows
