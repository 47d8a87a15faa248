"""The GPT: two families (GPT-2 and Llama style) from one set of tensor-parallel blocks.

Reads like single-device code: the tensor-parallel layers hide their communication, and
with `TPGroup.single()` every one of them is exactly the dense torch layer. Never imports
deepspeed; a runtime wraps this model. The pieces (`embed_positions`, `Block`,
`vocab_logits`, `lm_loss`) are also what `model/stages.py` cuts into pipeline stages.

Shapes: B batch, T tokens, d = n_embd, hd = head size; a `_l` suffix means "this TP
rank's share" (heads / tp, vocab / tp). With sequence parallelism (`tp.sequence_parallel`)
the residual stream between the TP regions is (B, T / tp, d), each rank's slice of the
sequence; the layers gather and scatter it (parallel/layers.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptscale.config import ModelConfig
from gptscale.model.loss import normalise_loss_sum
from gptscale.parallel.layers import (ColumnParallelLinear, LayerNorm, RMSNorm, RowParallelLinear,
                                      VocabParallelEmbedding, VocabParallelHead, mask_vocab_padding,
                                      replicated_on_slice, sequence_parallel_off)
from gptscale.parallel.primitives import gather_from_tp
from gptscale.parallel.topology import TPGroup

NOT_DECAYED = ("pos_embed",)  # matrices that weight decay leaves alone (besides every vector)


def weight_decay_applies(name: str, shape: torch.Size | tuple[int, ...]) -> bool:
    """The decay rule, by canonical parameter name and (full) shape: matrices are decayed;
    norms, biases and the learned positions are not."""
    return len(shape) >= 2 and name not in NOT_DECAYED


def make_norm(cfg: ModelConfig, tp: TPGroup) -> nn.Module:
    if cfg.uses_rmsnorm:
        return RMSNorm(cfg.n_embd, tp, eps=cfg.norm_eps)
    return LayerNorm(cfg.n_embd, tp, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """RoPE tables in the "rotate half" convention (first half of each head pairs with the
    second half), the one Hugging Face's Llama uses, so conversion needs no permutation."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (max_len, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # (T, hd) each


def embed_positions(x: torch.Tensor, pos_embed: torch.Tensor | None, start: int = 0) -> torch.Tensor:
    """Token vectors (B, T, d) plus learned positions start .. start+T-1 (gpt2); unchanged for RoPE models."""
    if pos_embed is None:
        return x
    return x + pos_embed[start:start + x.shape[1]]


def add_positions(owner: nn.Module, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """`embed_positions` with `owner.pos_embed` for the tokens x holds: under sequence
    parallelism this rank's slice of the sequence, T / tp tokens from rank * T / tp."""
    if owner.sequence_parallel:
        start += owner.tp.rank * x.shape[1]
    return embed_positions(x, replicated_on_slice(owner.pos_embed, owner), start)


def vocab_logits(projection: nn.Module, x: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """Hidden states -> this rank's slice of the logits (B, T, V_pad / tp), padding masked.
    `projection` is the output head, or the token embedding when the two are tied."""
    if isinstance(projection, VocabParallelEmbedding):
        logits = projection(unembed=x)
    else:
        logits = projection(x)
    return mask_vocab_padding(logits, vocab_size, tp)


def vocab_loss_sum(projection: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hidden states -> the cross-entropy of the logits `vocab_logits` would give, summed over
    the labelled tokens (0-dim), computed chunk by chunk inside `projection`'s forward (ZeRO-3
    gathers its weight there) without the whole batch's logits ever existing."""
    if isinstance(projection, VocabParallelEmbedding):
        return projection(unembed=x, targets=labels)
    return projection(x, targets=labels)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding (this rank's heads only)."""

    def __init__(self, n_layer: int, batch: int, n_kv_local: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, batch, n_kv_local, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} tokens; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Causal self-attention with a fused QKV projection and grouped-query heads.

    The fused weight is laid out by key/value group: for each kv head g, the rows of its
    n_head/n_kv_head query heads, then k_g, then v_g. Splitting dim 0 into tp equal
    chunks therefore hands each rank whole groups, so the QKV weight is a plain COLUMN split.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_head_l = cfg.n_head // tp.size
        self.n_kv_l = cfg.n_kv_head // tp.size
        self.q_per_kv = cfg.n_head // cfg.n_kv_head
        self.dropout = cfg.dropout
        self.selective_recompute = cfg.activation_checkpointing == "selective"
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.n_embd, qkv_out, tp, bias=cfg.bias, init_std=cfg.init_std)
        # Depth-scaled init of the residual projections (GPT-2): std / sqrt(2 * n_layer).
        self.proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, tp, bias=cfg.bias,
                                      init_std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, (n_head_l + 2 n_kv_l) hd); the whole sequence under sequence parallelism
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.n_kv_l, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, :self.q_per_kv].reshape(B, T, self.n_head_l, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.q_per_kv].transpose(1, 2)  # (B, n_kv_l, T, hd)
        v = qkv[:, :, :, self.q_per_kv + 1].transpose(1, 2)  # (B, n_kv_l, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # q: (B, n_head_l, T, hd)

        cached = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_l, cached + T, hd)
        if self.selective_recompute and self.training and cache is None:
            # Selective recompute (Korthikanti et al. 2022): keep q, k, v, not the core's output
            # and statistics, and run softmax(QK^T)V again in backward (the RNG is replayed).
            y = checkpoint(self._core, q, k, v, 0, use_reentrant=False)
        else:
            y = self._core(q, k, v, cached)
        y = y.transpose(1, 2).reshape(B, T, self.n_head_l * self.head_dim)  # (B, T, d / tp)
        return self.proj(y)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int) -> torch.Tensor:
        """softmax(QK^T / sqrt(hd)) V, causal after `cached` earlier tokens: (B, n_head_l, T, hd)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_causal_mask(q.shape[2], cached, q.device), is_causal=cached == 0,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.q_per_kv > 1)


def _causal_mask(T: int, cached: int, device: torch.device) -> torch.Tensor | None:
    """Mask for T new queries after `cached` tokens; None where is_causal or no mask suffices."""
    if cached == 0 or T == 1:
        return None  # fresh sequence: is_causal; a single new token may see everything
    return torch.ones(T, cached + T, dtype=torch.bool, device=device).tril(diagonal=cached)


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama); hidden units split across TP ranks."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        d, f, std = cfg.n_embd, cfg.ffn_hidden, cfg.init_std
        self.gated = cfg.uses_gated_mlp
        self.up = ColumnParallelLinear(d, f, tp, bias=cfg.bias, init_std=std)
        if self.gated:
            self.gate = ColumnParallelLinear(d, f, tp, bias=cfg.bias, init_std=std)
        self.down = RowParallelLinear(f, d, tp, bias=cfg.bias, init_std=std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up.region_input(x)  # once for gate and up: (B, T, d), gathered under sequence parallelism
        if self.gated:
            h = F.silu(self.gate(x, entered=True)) * self.up(x, entered=True)  # (B, T, f / tp)
        else:
            h = F.gelu(self.up(x, entered=True), approximate="tanh")  # (B, T, f / tp)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.norm1 = make_norm(cfg, tp)
        self.attn = Attention(cfg, tp)
        self.norm2 = make_norm(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.drop = nn.Dropout(cfg.dropout)

        self.full_recompute = cfg.activation_checkpointing == "full"

    def forward(self, x, rope=None, cache=None, layer=0):
        if self.full_recompute and self.training and cache is None:
            # Activation recompute, for every run mode: keep only the block's input and run the
            # block again during backward (torch's non-reentrant checkpoint replays the RNG).
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope, cache, layer)

    def _forward(self, x, rope, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Decoder-only transformer. `tp` is this rank's tensor-parallel group (single by default).

    forward(ids) -> this rank's vocabulary slice of the logits, (B, T, V_pad / tp);
    forward(ids, labels) -> mean cross-entropy over the labelled tokens (`lm_loss`'s value; with
    `num_valid_tokens`, the sum over them divided by that global count), computed fused with
    the output projection, so the logits of the whole batch never exist (`vocab_loss_sum`).
    Dropout note: ranks of one TP group must share the RNG seed so that dropout on the
    replicated residual stream agrees; the trainer seeds them so.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        cfg.check_tensor_parallel(tp.size)
        self.cfg, self.tp, self.sequence_parallel = cfg, tp, tp.sequence_parallel
        self.padded_vocab = cfg.padded_vocab_size(tp.size)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, self.padded_vocab, cfg.n_embd, tp, init_std=cfg.init_std)
        # A bare Parameter initialised here, not an nn.Embedding initialised afterwards: under
        # ZeRO-3's zero.Init a submodule's parameters are partitioned as soon as it is built.
        self.pos_embed = None
        if not cfg.uses_rope:
            self.pos_embed = nn.Parameter(torch.empty(cfg.block_size, cfg.n_embd).normal_(std=cfg.init_std))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.uses_rope else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, tp) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, tp)
        self.head = None if cfg.tie_embeddings else VocabParallelHead(
            cfg.n_embd, cfg.vocab_size, self.padded_vocab, tp, init_std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, num_valid_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None and self.sequence_parallel:
            with sequence_parallel_off(self):  # decoding feeds one token at a time: nothing to split
                return self.forward(input_ids, labels, cache, num_valid_tokens)
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size={self.cfg.block_size}")
        if self.sequence_parallel and T % self.tp.size:
            raise ValueError(f"sequence parallelism splits {T} tokens over {self.tp.size} TP ranks: not divisible")

        x = self.drop(add_positions(self, self.embed(input_ids), start))  # (B, T, d); T / tp under SP
        rope = self.rope(torch.arange(start, start + T, device=input_ids.device)) if self.rope is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.norm_f(x)
        if labels is None:
            return self.output_logits(x)  # (B, T, V_pad / tp)
        return normalise_loss_sum(vocab_loss_sum(self.output_projection, x, labels), labels, num_valid_tokens)

    @property
    def output_projection(self) -> nn.Module:
        return self.head if self.head is not None else self.embed  # tied: the embedding matrix

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_logits(self.output_projection, x, self.cfg.vocab_size, self.tp)

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Gather this rank's vocabulary slice into logits over the real vocabulary."""
        return gather_from_tp(local_logits, self.tp)[..., :self.cfg.vocab_size]

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        ref = self.embed.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_kv_head // self.tp.size, max_len,
                       self.cfg.head_dim, ref.dtype, ref.device)
