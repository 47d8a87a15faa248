"""Exact parameter counts and FLOPs per token, by arithmetic on a ModelConfig (no torch).

`count_parameters` must equal `sum(p.numel())` of the instantiated model; a test checks
that for every preset (instantiated on the meta device, so even ~1T costs no memory).
"""
from __future__ import annotations

from dataclasses import dataclass

from gptscale.config import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    embedding: int  # token embedding (and the output head when tied)
    positional: int  # learned positions (gpt2); 0 with RoPE
    blocks: int  # all transformer blocks
    final_norm: int
    head: int  # untied output head; 0 when tied

    @property
    def total(self) -> int:
        return self.embedding + self.positional + self.blocks + self.final_norm + self.head

    @property
    def matmul(self) -> int:
        """Parameters that take part in a matmul per token: blocks and the output projection.

        Lookups (the input embedding when untied, positions) cost no FLOPs; the tied
        embedding matrix does, as the output head.
        """
        output_projection = self.embedding if self.head == 0 else self.head
        return self.blocks + self.final_norm + output_projection


def norm_parameters(cfg: ModelConfig) -> int:
    # RMSNorm has a scale only; LayerNorm has scale and (with bias) shift.
    return cfg.n_embd * (2 if cfg.bias and not cfg.uses_rmsnorm else 1)


def block_parameters(cfg: ModelConfig) -> int:
    d, f = cfg.n_embd, cfg.ffn_hidden
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    attention = d * qkv_out + cfg.n_head * cfg.head_dim * d
    mlp = (3 if cfg.uses_gated_mlp else 2) * d * f
    if cfg.bias:
        attention += qkv_out + d
        mlp += (2 * f if cfg.uses_gated_mlp else f) + d
    return attention + mlp + 2 * norm_parameters(cfg)


def count_parameters(cfg: ModelConfig, padded_vocab: int | None = None) -> ParameterCount:
    """Parameters of the full (TP-merged) model; `padded_vocab` counts the padded rows too."""
    vocab = padded_vocab if padded_vocab is not None else cfg.vocab_size
    return ParameterCount(
        embedding=vocab * cfg.n_embd,
        positional=0 if cfg.uses_rope else cfg.block_size * cfg.n_embd,
        blocks=cfg.n_layer * block_parameters(cfg),
        final_norm=norm_parameters(cfg),
        head=0 if cfg.tie_embeddings else vocab * cfg.n_embd,
    )


def replicated_per_block(cfg: ModelConfig) -> int:
    """Parameters every TP rank holds whole in one block: its two norms and, with biases, the
    row-parallel biases (attention output and MLP down)."""
    return 2 * norm_parameters(cfg) + (2 * cfg.n_embd if cfg.bias else 0)


def parameters_per_tp_rank(cfg: ModelConfig, tp: int) -> int:
    """Parameters one TP rank of `tp` holds (vocabulary padded for tp): split tensors count
    1/tp, replicated ones (norms, positions, row-parallel biases) whole. Arithmetic, so any
    size answers at once; equals sum(p.numel()) of GPT(cfg, TPGroup.shape_only(tp))."""
    d, f = cfg.n_embd, cfg.ffn_hidden
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    up_projections = 2 if cfg.uses_gated_mlp else 1
    split = d * qkv_out + cfg.n_head * cfg.head_dim * d + (up_projections + 1) * d * f
    replicated = replicated_per_block(cfg)
    if cfg.bias:
        split += qkv_out + up_projections * f
    vocab_rows = cfg.padded_vocab_size(tp) * d * (1 if cfg.tie_embeddings else 2)
    positions = 0 if cfg.uses_rope else cfg.block_size * d
    return (cfg.n_layer * (split // tp + replicated) + vocab_rows // tp + positions + norm_parameters(cfg))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12*L*H*Q*T (PaLM, appendix B).

    N counts the matmul parameters (see ParameterCount.matmul), the second term the
    attention score and value products over a context of T=seq_len tokens.
    """
    seq_len = cfg.block_size if seq_len is None else seq_len
    n = count_parameters(cfg).matmul
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
