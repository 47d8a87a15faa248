"""The GPT as a flat sequence of stage layers, for pipeline parallelism.

The same building blocks as `gpt.py` (Block, the vocab-parallel embedding and head, the
final norm), cut at block boundaries so a pipeline can put consecutive layers on
consecutive stages. Each layer takes one tensor and returns one tensor:

    token ids -> [embed] -> [positions] -> [block 0] ... [block L-1] -> [final norm] -> [head] -> logits

Never imports deepspeed: `engine/pipeline.py` turns this description into DeepSpeed
`LayerSpec`s. Parameter names are canonical: a layer's `prefix` plus its own parameter
name is the name the dense `GPT` uses (`blocks.3.` + `attn.qkv.weight`), so checkpoints of
either mode convert through the same split table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from gptscale.config import ModelConfig
from gptscale.model.gpt import IGNORE_INDEX, Block, RotaryEmbedding, make_norm
from gptscale.parallel.layers import (VocabParallelEmbedding, VocabParallelHead, mask_vocab_padding,
                                      vocab_parallel_cross_entropy)
from gptscale.parallel.topology import TPGroup

TIED_EMBEDDING = "embed"  # key shared by the input embedding and the tied output projection


class TokenEmbedding(nn.Module):
    """Token ids -> vectors; with tied embeddings also the output projection (see `unembed`)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.padded_vocab_size(tp.size), cfg.n_embd, tp,
                                            init_std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, d)


def unembed(module: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied output projection on the last stage: this rank's vocabulary slice of the logits."""
    return mask_vocab_padding(module.embed(unembed=x), module.cfg.vocab_size, module.tp)  # (B, T, V_pad / tp)


class InputPositions(nn.Module):
    """Learned positions (gpt2) and embedding dropout; for RoPE models only the dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos_embed = None
        if not cfg.uses_rope:
            self.pos_embed = nn.Parameter(torch.empty(cfg.block_size, cfg.n_embd).normal_(std=cfg.init_std))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed[: x.shape[1]]
        return self.drop(x)


class PipeBlock(Block):
    """A transformer block that computes its own RoPE angles (a stage receives only the
    hidden states; the tables are buffers, not parameters, so nothing is saved twice)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__(cfg, tp)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.uses_rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.rope(torch.arange(x.shape[1], device=x.device)) if self.rope is not None else None
        return super().forward(x, rope)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_f = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class OutputHead(nn.Module):
    """The untied output projection: this rank's vocabulary slice of the logits."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.head = VocabParallelHead(cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size(tp.size), tp,
                                      init_std=cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mask_vocab_padding(self.head(x), self.cfg.vocab_size, self.tp)  # (B, T, V_pad / tp)


class PipelineLoss:
    """Mean cross-entropy over labelled tokens of one micro-batch, as `GPT.forward(ids, labels)`."""

    def __init__(self, tp: TPGroup):
        self.tp = tp

    def __call__(self, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = vocab_parallel_cross_entropy(local_logits, labels, self.tp, ignore_index=IGNORE_INDEX)
        return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


@dataclass(frozen=True)
class StageLayer:
    """One entry of the pipeline: how to build it and what its parameters are called.

    tie_key: layers with the same key share one module (and its weights) across stages;
    forward_fn: for a tied layer used differently from its first use (module, x) -> y.
    """

    build: type[nn.Module]
    args: tuple[Any, ...]
    prefix: str  # canonical name prefix of this layer's parameters
    tie_key: str | None = None
    forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    is_block: bool = field(default=False)


def stage_layers(cfg: ModelConfig, tp: TPGroup) -> list[StageLayer]:
    """The GPT of `cfg` as pipeline layers, in order."""
    tie = TIED_EMBEDDING if cfg.tie_embeddings else None
    layers = [StageLayer(TokenEmbedding, (cfg, tp), prefix="", tie_key=tie),
              StageLayer(InputPositions, (cfg,), prefix="")]
    layers += [StageLayer(PipeBlock, (cfg, tp), prefix=f"blocks.{i}.", is_block=True) for i in range(cfg.n_layer)]
    layers.append(StageLayer(FinalNorm, (cfg,), prefix=""))
    if cfg.tie_embeddings:
        # The same TokenEmbedding module; its weight is kept equal across the first and last
        # stage, whose gradients are summed, exactly as one shared matrix in the dense model.
        layers.append(StageLayer(TokenEmbedding, (cfg, tp), prefix="", tie_key=TIED_EMBEDDING, forward_fn=unembed))
    else:
        layers.append(StageLayer(OutputHead, (cfg, tp), prefix=""))
    return layers


def layers_with_parameters(layers: list[StageLayer]) -> list[int]:
    """Indices of the layers whose parameters a checkpoint stores (a tied layer's second use
    holds no parameters of its own)."""
    seen, out = set(), []
    for index, layer in enumerate(layers):
        if layer.tie_key is not None:
            if layer.tie_key in seen:
                continue
            seen.add(layer.tie_key)
        out.append(index)
    return out
