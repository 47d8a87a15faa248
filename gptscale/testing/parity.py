"""Tensor-parallel model vs its dense twin, on one rank of a running TP group.

Shared by the test suite and `gptscale selftest`: both build the dense model and the TP
model from the same full weights and compare logits, loss, every gradient and generation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gptscale.config import LoRAConfig, ModelConfig
from gptscale.convert.tp import merge_tp, split_tp
from gptscale.model.generate import generate
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import IGNORE_INDEX, split_table
from gptscale.parallel.lora import add_lora, adapter_parameters
from gptscale.parallel.topology import TPGroup


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def shard_like(dense: GPT, model: GPT, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This TP rank's slice of a dense model's tensors (weights or grads), vocabulary re-padded."""
    table = split_table(model)
    canonical = merge_tp([full], table, dense.cfg.vocab_size)
    return split_tp(canonical, table, model.tp.size, model.padded_vocab)[model.tp.rank]


def tp_parity(cfg: ModelConfig, tp: TPGroup, *, seed: int = 0, batch: int = 2, seq_len: int = 24,
              lora: LoRAConfig | None = None) -> dict:
    """Max abs differences between the TP model and the dense model built from the same weights.

    Every rank must call this with the same arguments: each builds the same dense model and
    batch from `seed`, then its own TP shard of it. With `lora`, both carry adapters from
    the same seed (`lora_init`: how far the TP model's initial A is from the dense one's
    slice), whose B is then made non-zero so that the adapter path counts.
    """
    torch.manual_seed(seed)
    dense = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    labels = ids.roll(-1, dims=1)
    labels[0, :seq_len // 4] = IGNORE_INDEX  # some tokens carry no loss, as in SFT

    model = GPT(cfg, tp)
    lora_init = 0.0
    if lora is not None:
        add_lora(dense, lora, seed)
        add_lora(model, lora, seed)
        initial = shard_like(dense, model, dense.state_dict())
        lora_init = max(max_abs_diff(p, initial[n]) for n, p in adapter_parameters(model).items())
        with torch.no_grad():
            for name, p in adapter_parameters(dense).items():
                if ".lora_B." in name:
                    p.normal_(std=0.05)
    model.load_state_dict(shard_like(dense, model, dense.state_dict()))

    logits = max_abs_diff(model.full_logits(model(ids)), dense.full_logits(dense(ids)))
    loss, dense_loss = model(ids, labels=labels), dense(ids, labels=labels)
    loss.backward()
    dense_loss.backward()
    expected = shard_like(dense, model, {n: p.grad for n, p in dense.named_parameters()})
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    grads = max((max_abs_diff(p.grad, expected[n]) for n, p in model.named_parameters() if p.grad is not None),
                default=float("inf"))

    prompt = ids[:, :4]
    greedy_same = torch.equal(generate(model, prompt, 8, temperature=0), generate(dense, prompt, 8, temperature=0))
    # A different generator on every rank on purpose: TP rank 0's choice must win everywhere.
    sampled = generate(model, prompt, 8, temperature=1.0, top_k=50,
                       generator=torch.Generator().manual_seed(100 + tp.rank))
    sampled_agree = True
    if tp.size > 1:
        copies = [torch.empty_like(sampled) for _ in range(tp.size)]
        dist.all_gather(copies, sampled, group=tp.group)
        sampled_agree = all(torch.equal(c, sampled) for c in copies)
    return dict(logits=logits, loss=abs(loss.item() - dense_loss.item()), grads=grads, missing=missing,
                greedy_same=greedy_same, sampled_agree=sampled_agree, lora_init=lora_init)


def parity_ok(result: dict, tolerance: float = 1e-5) -> bool:
    return (not result["missing"] and result["greedy_same"] and result["sampled_agree"]
            and max(result["logits"], result["loss"], result["grads"]) <= tolerance)
