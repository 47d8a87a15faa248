"""The output projection and the cross-entropy as one chunked operation: the logits of the
whole batch never exist, on any rank, in any dtype.

Unfused, the loss of a (tokens, d) batch materialises this rank's (tokens, V_pad / tp) logits,
an fp32 copy of them and an fp32 softmax kept for backward: at GPT-2 124M with 8 x 1024
tokens, 1.65 GB each. Here the tokens are processed in chunks of `chunk_tokens`: a chunk's
logits are computed in the input dtype, upcast to fp32, turned into the chunk's loss and, when
a gradient is wanted, at once into its gradients, then dropped.

Gradients in the forward pass (as Liger-Kernel's fused linear cross-entropy does). The result
is the loss summed over the tokens, so its gradient with respect to every token's logits is
(softmax - onehot) times one scalar, the upstream gradient, which backward only multiplies in.
So the product with the weight runs three times per chunk, as unfused (logits; d hidden;
d weight), not four: recomputing the logits in backward would cost one more head GEMM, 28% of
the loss's time on the CPU at GPT-2 124M and ~8% of the model's FLOPs on a GPU. What stays
alive from forward to backward is the hidden states' gradient (the size of the hidden states,
which the unfused path kept anyway) and the weight's (the size of the weight slice).

Tensor parallelism: each rank holds a slice of the vocabulary. A chunk's softmax needs the
log-sum-exp over every rank's slice, so each chunk takes one MAX all-reduce of the ranks'
per-token log-sum-exps and one SUM all-reduce of (exp(lse_rank - max), target logit): per-token
scalars only. The hidden states' gradient is summed over the ranks by the region entry
(copy_to_tp / gather_sequence) the caller put in front.

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


def _chunk_lse_and_target(logits: torch.Tensor, columns: torch.Tensor, mine: torch.Tensor,
                          tp: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of a chunk: the log-sum-exp over the whole vocabulary and the target's logit,
    from this rank's fp32 logits (chunk, V_real_local), which may have no columns."""
    if logits.shape[-1]:
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(-1, columns[:, None]).squeeze(-1) * mine
    else:  # a rank holding only padding: exp(-inf) = 0 and no target
        lse = logits.new_full(logits.shape[:1], float("-inf"))
        target = logits.new_zeros(logits.shape[:1])
    if tp.size > 1:
        # log sum_r exp(lse_r) = m + log sum_r exp(lse_r - m) with m the ranks' max.
        top = all_reduce_no_grad(lse.clone(), tp, op=torch.distributed.ReduceOp.MAX)
        sums = all_reduce_no_grad(torch.stack([(lse - top).exp(), target]), tp)
        lse, target = top + sums[0].log(), sums[1]
    return lse, target


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp, vocab_size, ignore_index, chunk_tokens, want_h, want_w):
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        t = targets.reshape(-1)  # (N,)
        w, start = _real_rows(weight, vocab_size, tp)  # (V_real_local, d)
        columns, mine = _target_columns(t, start, w.shape[0], ignore_index)
        valid = t != ignore_index

        grad_h = torch.zeros_like(h) if want_h else None
        grad_weight = torch.zeros_like(weight) if want_w else None  # padding rows stay zero
        # The weight's gradient is a sum over every chunk: accumulated in fp32 whatever its dtype.
        grad_w = None
        if want_w:
            grad_w = grad_weight[:w.shape[0]] if weight.dtype == torch.float32 else w.new_zeros(w.shape, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows in _chunks(h.shape[0], chunk_tokens):
            logits = F.linear(h[rows], w).float()  # (chunk, V_real_local): the only logits alive
            lse, target = _chunk_lse_and_target(logits, columns[rows], mine[rows], tp)
            total += ((lse - target) * valid[rows]).sum()
            if not (want_h or want_w) or not w.shape[0]:
                continue
            g = logits.sub_(lse[:, None]).exp_().mul_(valid[rows, None])  # softmax; ignored tokens: none
            g.scatter_add_(-1, columns[rows, None], -mine[rows, None].to(g.dtype))  # - onehot
            g = g.to(h.dtype)  # d total / d logits
            if want_h:
                grad_h[rows] = g @ w
            if want_w and grad_w.dtype == g.dtype:
                grad_w.addmm_(g.t(), h[rows])  # in place: no (V_real_local, d) temporary
            elif want_w:
                grad_w += g.t() @ h[rows]
        if want_w and weight.dtype != torch.float32:
            grad_weight[:w.shape[0]] = grad_w
        ctx.save_for_backward(*(g for g in (grad_h, grad_weight) if g is not None))
        ctx.want_h, ctx.want_w, ctx.hidden_shape = want_h, want_w, hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0).view(ctx.hidden_shape) * grad_total if ctx.want_h else None
        grad_weight = saved.pop(0) * grad_total if ctx.want_w else None
        return grad_h, grad_weight, None, None, None, None, None, None, None


def _chunks(tokens: int, chunk_tokens: int):
    return (slice(s, s + chunk_tokens) for s in range(0, tokens, chunk_tokens))


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp: TPGroup, *,
                             vocab_size: int, ignore_index: int, chunk_tokens: int | None = None) -> torch.Tensor:
    """The cross-entropy of the logits hidden @ weight^T summed over the tokens whose target is
    not ignore_index, in fp32, without materialising those logits; 0-dim.

    hidden: (..., d) the whole sequence on every rank of `tp` (already through the TP region's
    entry); weight: (V_pad / tp, d) this rank's vocabulary rows; targets: (...) global token ids.
    The gradients are computed here, in the forward pass, when autograd will want them (a frozen
    weight gets none and costs no weight product; under no_grad, evaluation, none at all).
    """
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    return _LinearCrossEntropySum.apply(hidden, weight, targets, tp, vocab_size, ignore_index, chunk_tokens,
                                        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
