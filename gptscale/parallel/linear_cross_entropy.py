"""The output projection and the cross-entropy as one chunked operation: the logits of the
whole batch never exist, on any rank, in any dtype.

Unfused, the loss of a (tokens, d) batch materialises this rank's (tokens, V_pad / tp) logits,
an fp32 copy of them and an fp32 softmax kept for backward: at GPT-2 124M with 8 x 1024
tokens, 1.65 GB each. Here the tokens are processed in chunks of `chunk_tokens`: a chunk's
logits are computed in the input dtype, upcast to fp32, reduced to two per-token scalars (the
log-sum-exp over this rank's vocabulary and the target's logit) and dropped. Backward
recomputes each chunk's logits from the saved hidden states (kept anyway as the projection's
input) and the per-token log-sum-exp, forms d loss / d logits = softmax - onehot, and
accumulates the gradients of the hidden states and of the weight chunk by chunk: one extra
(tokens x d x V / tp) GEMM bought for the memory. (A batch that fits in one chunk keeps its
fp32 softmax instead, at most one chunk's bytes, and skips that GEMM.)

Tensor parallelism: each rank holds a slice of the vocabulary. Only per-token scalars cross
the wire, and the number of collectives does not grow with the number of chunks: after the
last chunk one MAX all-reduce of the ranks' log-sum-exps and one SUM all-reduce of
(exp(lse_rank - max), target logit) stacked. Backward needs no collective here; the hidden
states' gradient is summed over the ranks by the region entry (copy_to_tp / gather_sequence)
the caller put in front.

Rows of the weight past `vocab_size` (padding) are sliced off before any product, so they
take no probability mass and get a zero gradient; at tp=1 the computation is the dense
cross-entropy over the real vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptscale.parallel.primitives import all_reduce_no_grad
from gptscale.parallel.topology import TPGroup

CHUNK_LOGIT_BYTES = 32 * 2**20  # fp32 logits of one chunk: large GEMMs, a bounded footprint


def default_chunk_tokens(local_vocab: int) -> int:
    """Tokens per chunk so that a chunk's fp32 logits take about CHUNK_LOGIT_BYTES."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * max(local_vocab, 1)))


def _real_rows(weight: torch.Tensor, vocab_size: int, tp: TPGroup) -> tuple[torch.Tensor, int]:
    """This rank's rows of the real vocabulary (padding sliced off) and its first token id."""
    local = weight.shape[0]
    start = tp.rank * local
    return weight[:max(0, min(local, vocab_size - start))], start


def _target_columns(targets: torch.Tensor, start: int, rows: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each target in this rank's slice, 0 where it is not here; whether it is here)."""
    local = targets - start
    mine = (local >= 0) & (local < rows) & (targets != ignore_index)
    return local.masked_fill(~mine, 0), mine


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp, vocab_size, ignore_index, chunk_tokens):
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        t = targets.reshape(-1)  # (N,)
        w, start = _real_rows(weight, vocab_size, tp)  # (V_real_local, d)
        columns, mine = _target_columns(t, start, w.shape[0], ignore_index)

        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
        target_logit = torch.zeros_like(lse)
        logits = None
        if w.shape[0]:  # a rank holding only padding contributes exp(-inf) = 0
            for rows in _chunks(h.shape[0], chunk_tokens):
                logits = F.linear(h[rows], w).float()  # (chunk, V_real_local): the only logits alive
                lse[rows] = torch.logsumexp(logits, dim=-1)
                target_logit[rows] = logits.gather(-1, columns[rows, None]).squeeze(-1)
        target_logit *= mine

        if tp.size > 1:
            # log sum_r exp(lse_r) = m + log sum_r exp(lse_r - m) with m the ranks' max.
            top = all_reduce_no_grad(lse.clone(), tp, op=torch.distributed.ReduceOp.MAX)
            sums = all_reduce_no_grad(torch.stack([(lse - top).exp(), target_logit]), tp)
            lse, target_logit = top + sums[0].log(), sums[1]

        # A batch that is one chunk keeps its softmax (one chunk's bytes, the bound anyway) and
        # backward skips the recompute; otherwise nothing of the size of logits is kept.
        softmax = logits.sub_(lse[:, None]).exp_() if logits is not None and h.shape[0] <= chunk_tokens else None
        valid = t != ignore_index
        ctx.save_for_backward(hidden, weight, targets, lse, softmax)
        ctx.tp, ctx.vocab_size, ctx.ignore_index, ctx.chunk_tokens = tp, vocab_size, ignore_index, chunk_tokens
        return ((lse - target_logit) * valid).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse, softmax = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        w, start = _real_rows(weight, ctx.vocab_size, ctx.tp)
        columns, mine = _target_columns(t, start, w.shape[0], ctx.ignore_index)
        scale = grad_loss.reshape(-1).float() * (t != ctx.ignore_index)  # (N,): d total / d loss_n

        want_h, want_w = ctx.needs_input_grad[:2]  # a frozen (LoRA) base head needs no weight gradient
        grad_h = torch.zeros_like(h) if want_h else None
        grad_weight = torch.zeros_like(weight) if want_w else None  # padding rows stay zero
        # The weight's gradient is a sum over every chunk: accumulated in fp32 whatever its dtype.
        grad_w = None
        if want_w:
            grad_w = grad_weight[:w.shape[0]] if weight.dtype == torch.float32 else w.new_zeros(w.shape, dtype=torch.float32)
        if w.shape[0]:
            for rows in _chunks(h.shape[0], ctx.chunk_tokens):
                p = softmax if softmax is not None else (  # saved: the batch is this one chunk
                    F.linear(h[rows], w).float() - lse[rows, None]).exp_()  # (chunk, V_real_local)
                g = p * scale[rows, None]  # out of place: a saved softmax stays intact
                g.scatter_add_(-1, columns[rows, None], -(mine[rows] * scale[rows])[:, None])  # - onehot
                g = g.to(h.dtype)  # d total / d logits
                if want_h:
                    grad_h[rows] = g @ w
                if want_w and grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), h[rows])  # in place: no (V_real_local, d) temporary
                elif want_w:
                    grad_w += g.t() @ h[rows]
        if want_w and weight.dtype != torch.float32:
            grad_weight[:w.shape[0]] = grad_w
        return (grad_h.view(hidden.shape) if want_h else None), grad_weight, None, None, None, None, None


def _chunks(tokens: int, chunk_tokens: int):
    return (slice(s, s + chunk_tokens) for s in range(0, tokens, chunk_tokens))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp: TPGroup, *,
                         vocab_size: int, ignore_index: int, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of the logits hidden @ weight^T (0 where targets == ignore_index),
    in fp32, without materialising those logits.

    hidden: (..., d) the whole sequence on every rank of `tp` (already through the TP region's
    entry); weight: (V_pad / tp, d) this rank's vocabulary rows; targets: (...) global token ids.
    """
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, tp, vocab_size, ignore_index, chunk_tokens)
