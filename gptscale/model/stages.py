"""The GPT cut into pipeline stages: the same pieces as `gpt.py`, as a flat list of layers.

    token ids -> [embed] -> [positions] -> [block 0] ... [block L-1] -> [final norm] -> [head] -> logits

Each layer takes one tensor and returns one tensor, so consecutive layers can live on
consecutive stages. The layers are `GPT`'s own pieces (the vocab-parallel embedding,
`embed_positions`, `Block`, the final norm, `vocab_logits`) and the loss is `lm_loss`;
nothing of the model is written a second time. Parameter names are canonical: a layer's
`prefix` plus its own parameter name is the name the dense `GPT` uses (`blocks.3.` +
`attn.qkv.weight`), so the checkpoints of every mode convert through the same split table.

`stage_bounds` is the one partitioner: both pipeline modes cut the layers where it says
(the pipe mode hands the boundaries to DeepSpeed's PipelineModule). `StageModule` is one
stage's layers as a plain module (pipe_zero3 wraps it in a ZeRO-3 engine; the checkpoint
reader names its parameters with `canonical_name`). Never imports deepspeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from gptscale.config import ModelConfig
from gptscale.model.gpt import Block, RotaryEmbedding, add_positions, make_norm, vocab_logits, vocab_loss_sum
from gptscale.parallel.layers import VocabParallelEmbedding, VocabParallelHead
from gptscale.parallel.topology import TPGroup

TIED_EMBEDDING = "embed"  # key shared by the input embedding and the tied output projection
PARTITION_METHODS = ("parameters", "blocks")


class TokenEmbedding(nn.Module):
    """Token ids -> vectors; with tied embeddings also the output projection (see `unembed`)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.padded_vocab_size(tp.size), cfg.n_embd, tp,
                                            init_std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, d)


def unembed(module: TokenEmbedding, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """The tied output projection on the last stage: this rank's vocabulary slice of the logits;
    with `targets`, the loss summed over the labelled tokens, fused (`vocab_loss_sum`)."""
    if targets is not None:
        return vocab_loss_sum(module.embed, x, targets)
    return vocab_logits(module.embed, x, module.cfg.vocab_size, module.tp)  # (B, T, V_pad / tp)


class InputPositions(nn.Module):
    """Learned positions (gpt2) and embedding dropout; for RoPE models only the dropout."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.tp, self.sequence_parallel = tp, tp.sequence_parallel
        self.pos_embed = None
        if not cfg.uses_rope:
            self.pos_embed = nn.Parameter(torch.empty(cfg.block_size, cfg.n_embd).normal_(std=cfg.init_std))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(add_positions(self, x))


class PipeBlock(Block):
    """A transformer block that computes its own RoPE angles (a stage receives only the
    hidden states; the tables are buffers, not parameters, so nothing is saved twice)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__(cfg, tp)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.uses_rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1] * (self.attn.qkv.tp.size if self.attn.qkv.sequence_parallel else 1)  # attention sees all
        rope = self.rope(torch.arange(tokens, device=x.device)) if self.rope is not None else None
        return super().forward(x, rope)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.norm_f = make_norm(cfg, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class OutputHead(nn.Module):
    """The untied output projection: this rank's vocabulary slice of the logits; with
    `targets`, the loss summed over the labelled tokens, fused (`vocab_loss_sum`)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.head = VocabParallelHead(cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size(tp.size), tp,
                                      init_std=cfg.init_std)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return vocab_loss_sum(self.head, x, targets)
        return vocab_logits(self.head, x, self.cfg.vocab_size, self.tp)  # (B, T, V_pad / tp)


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

    def make(self) -> nn.Module:
        return self.build(*self.args)


def stage_layers(cfg: ModelConfig, tp: TPGroup) -> list[StageLayer]:
    """The GPT of `cfg` as pipeline layers, in order."""
    tie = TIED_EMBEDDING if cfg.tie_embeddings else None
    layers = [StageLayer(TokenEmbedding, (cfg, tp), prefix="", tie_key=tie),
              StageLayer(InputPositions, (cfg, tp), prefix="")]
    layers += [StageLayer(PipeBlock, (cfg, tp), prefix=f"blocks.{i}.", is_block=True) for i in range(cfg.n_layer)]
    layers.append(StageLayer(FinalNorm, (cfg, tp), prefix=""))
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


# -- the partitioner -------------------------------------------------------------------------

def stage_bounds(cfg: ModelConfig, pp: int, method: str) -> list[int]:
    """Layer boundaries [b0=0, b1, ..., bp=len(layers)] of `pp` stages, the same on every rank.

    method `parameters` balances parameter counts (the embedding and head weigh in; a tied
    embedding counts on both stages that use it), `blocks` balances numbers of blocks.
    Shapes come from the meta device: nothing is allocated or initialised.
    """
    if method not in PARTITION_METHODS:
        raise ValueError(f"unknown partition method {method!r}; one of {PARTITION_METHODS}")
    with torch.device("meta"):
        layers = stage_layers(cfg, TPGroup.shape_only(1))
        if method == "blocks":
            weights = [1 if layer.is_block else 0 for layer in layers]
        else:
            weights = [sum(p.numel() for p in layer.make().parameters()) for layer in layers]
    return partition_balanced(weights, pp)


def describe_stages(layers: list[StageLayer], bounds: list[int], piece: str = "stage") -> str:
    """One line naming each stage's layers, e.g. 'stage 0: embedding, positions, blocks 0-1 | stage 1: ...'
    (`piece`: what the cut pieces are called; "chunk" for interleaved model chunks)."""
    stages = []
    for stage, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        names, blocks = [], []
        for layer in layers[start:stop]:
            if layer.is_block:
                blocks.append(int(layer.prefix.split(".")[1]))
                continue
            if blocks:
                names.append(_block_range(blocks))
                blocks = []
            names.append(_LAYER_NAMES[layer.build.__name__] if layer.forward_fn is None else "head (tied embedding)")
        if blocks:
            names.append(_block_range(blocks))
        stages.append(f"{piece} {stage}: {', '.join(names)}")
    return " | ".join(stages)


_LAYER_NAMES = {"TokenEmbedding": "embedding", "InputPositions": "positions", "FinalNorm": "final norm",
                "OutputHead": "head"}


def _block_range(blocks: list[int]) -> str:
    return f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """Boundaries cutting `weights` into `parts` consecutive runs whose sums differ least
    (smallest max - min), by dynamic programming over prefix sums; among equal costs the last
    cut found wins. This is DeepSpeed 0.19's `partition_balanced` rule, kept exactly so that
    stage boundaries (and which layers a stage builds from its seed) do not change; checked
    against DeepSpeed's in tests/unit/test_stages.py. Fewer items than parts: one per part."""
    n = len(weights)
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    inf = float("inf")
    prefix = [0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    # best[i][j]: (cost, max, min) of cutting the first i items into j runs; cut[i][j]: where run j starts.
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    high = [[inf] * (parts + 1) for _ in range(n + 1)]
    low = [[inf] * (parts + 1) for _ in range(n + 1)]
    cut = [[0] * (parts + 1) for _ in range(n + 1)]
    cost[0][0], high[0][0] = 0, 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                run = prefix[i] - prefix[k]
                run_high, run_low = max(high[k][j - 1], run), min(low[k][j - 1], run)
                if cost[i][j] >= run_high - run_low:
                    cost[i][j], high[i][j], low[i][j], cut[i][j] = run_high - run_low, run_high, run_low, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return bounds[::-1]


def chunk_ranges(cfg: ModelConfig, pp: int, method: str, virtual_stages: int = 1) -> list[list[tuple[int, int]]]:
    """For each stage, the [start, stop) layer ranges of its model chunks. With v virtual stages
    (interleaved 1F1B) the layers are cut into pp·v pieces by the one partitioner and stage s
    holds pieces s, pp + s, ..., (v-1)·pp + s; with v = 1 each stage holds one range."""
    bounds = stage_bounds(cfg, pp * virtual_stages, method)
    return [[(bounds[c * pp + s], bounds[c * pp + s + 1]) for c in range(virtual_stages)] for s in range(pp)]


def stage_specs(layers: list[StageLayer], ranges: list[tuple[int, int]]) -> list[StageLayer]:
    """A stage's layers, its chunks' in order: the order of its `layers.<i>` parameters."""
    return [layer for start, stop in ranges for layer in layers[start:stop]]


class StageModule(nn.Module):
    """One pipeline stage as a plain module: the GPT's stage layers in `ranges` (one [start,
    stop) range, or one per model chunk with interleaved 1F1B), applied in order; forward(x,
    chunk) runs one chunk. Its parameters are `layers.<i>.<name>` over all its chunks' layers
    (see `canonical_name`)."""

    def __init__(self, layers: list[StageLayer], ranges: list[tuple[int, int]]):
        super().__init__()
        self.specs = stage_specs(layers, ranges)
        offsets = [0]
        for start, stop in ranges:
            offsets.append(offsets[-1] + stop - start)
        self.chunk_offsets = offsets  # chunk c is layers[offsets[c]:offsets[c + 1]]
        built: dict[str, nn.Module] = {}  # tie key -> the module both uses share on this stage
        for spec in self.specs:
            if spec.tie_key is not None and spec.tie_key not in built:
                built[spec.tie_key] = spec.make()
        self.layers = nn.ModuleList(built[spec.tie_key] if spec.tie_key is not None else spec.make()
                                    for spec in self.specs)

    def forward(self, x: torch.Tensor, chunk: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Chunk `chunk`'s layers on x. With `labels` (the model's last chunk, whose last layer
        is the head) the head returns the loss summed over the labelled tokens, computed fused
        with the projection, instead of the logits."""
        start, stop = self.chunk_offsets[chunk], self.chunk_offsets[chunk + 1]
        for index, (spec, layer) in enumerate(zip(self.specs[start:stop], self.layers[start:stop]), start):
            head = {"targets": labels} if labels is not None and index == stop - 1 else {}
            x = layer(x, **head) if spec.forward_fn is None else spec.forward_fn(layer, x, **head)
        return x

    def tied_modules(self) -> dict[str, nn.Module]:
        """tie key -> this stage's module of that tied layer (pipe_zero3 keeps the copies on
        two stages equal)."""
        return {spec.tie_key: layer for spec, layer in zip(self.specs, self.layers) if spec.tie_key is not None}

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        return {spec.prefix + name: param for spec, layer in zip(self.specs, self.layers)
                for name, param in layer.named_parameters()}

    @staticmethod
    def canonical_name(specs: list[StageLayer], name: str) -> str:
        """'layers.3.attn.qkv.weight' of a stage built from `specs` -> its canonical name."""
        _, index, rest = name.split(".", 2)
        return specs[int(index)].prefix + rest


def tied_stages(layers: list[StageLayer], ranges: list[list[tuple[int, int]]]) -> dict[str, list[int]]:
    """tie key -> the stages (each holding the layer `ranges` of `chunk_ranges`) holding a use
    of that tied layer, in order."""
    out: dict[str, list[int]] = {}
    for stage, stage_ranges in enumerate(ranges):
        for layer in stage_specs(layers, stage_ranges):
            if layer.tie_key is not None and stage not in out.setdefault(layer.tie_key, []):
                out[layer.tie_key].append(stage)
    return out
