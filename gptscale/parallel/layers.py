"""Tensor-parallel building blocks. With a single-rank TPGroup each is exactly its dense twin.

Every parameter is tagged with how it is split across TP ranks (`param.tp_split`), the one
table that checkpoint merge/split and LoRA read:

    COLUMN      dim 0 (output features) is split          ColumnParallelLinear.weight / .bias
    ROW         dim 1 (input features) is split           RowParallelLinear.weight
    VOCAB       dim 0 is the padded vocabulary, split      embedding, untied output head
    REPLICATED  every rank holds the whole tensor          norms, positions, row-parallel bias

Split parameters also carry `tensor_model_parallel = True`, the attribute DeepSpeed reads
to avoid counting replicated parameters once per TP rank in the gradient norm.

Sequence parallelism (`tp.sequence_parallel`): outside the TP regions the activations are
(B, T / tp, d), a different slice of the sequence on each rank. A column-parallel layer's
input is then all-gathered (its gradient reduce-scattered) and a row-parallel layer's output
reduce-scattered (its gradient all-gathered). A replicated parameter used on a sequence
slice (norms, the row-parallel bias, learned positions) sees only its slice's gradient, so
it enters through `copy_to_tp` (`replicated_on_slice`), whose backward sums over the group.
Every such layer has a `sequence_parallel` attribute; `sequence_parallel_off` clears them
for incremental decoding, where one new token cannot be split.
"""
from __future__ import annotations

import contextlib
import enum

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptscale.parallel.linear_cross_entropy import linear_cross_entropy_sum
from gptscale.parallel.primitives import (all_reduce_no_grad, copy_to_tp, gather_from_tp, gather_sequence, reduce_from_tp,
                                          reduce_scatter_sequence, scatter_to_tp)
from gptscale.parallel.topology import TPGroup

IGNORE_INDEX = -100  # label value that contributes no loss (prompt tokens in SFT, padding)


class Split(str, enum.Enum):
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"

    @property
    def dim(self) -> int | None:
        return {Split.COLUMN: 0, Split.ROW: 1, Split.VOCAB: 0}.get(self)


def mark_split(param: nn.Parameter, split: Split) -> nn.Parameter:
    param.tp_split = split
    param.tensor_model_parallel = split is not Split.REPLICATED
    return param


def split_table(module: nn.Module) -> dict[str, Split]:
    """name -> Split for every parameter of `module`; untagged ones are replicated."""
    return {name: getattr(p, "tp_split", Split.REPLICATED) for name, p in module.named_parameters()}


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {parts}")
    return total // parts


def replicated_on_slice(param: torch.Tensor | None, layer: nn.Module) -> torch.Tensor | None:
    """A replicated parameter as `layer` uses it: under sequence parallelism through
    `copy_to_tp`, so its gradient is the sum over every rank's slice of the sequence."""
    if param is None or not layer.sequence_parallel:
        return param
    return copy_to_tp(param, layer.tp)


@contextlib.contextmanager
def sequence_parallel_off(model: nn.Module):
    """Run `model` with whole sequences on every TP rank (decoding: one new token cannot be split)."""
    layers = [m for m in model.modules() if getattr(m, "sequence_parallel", False)]
    for layer in layers:
        layer.sequence_parallel = False
    try:
        yield
    finally:
        for layer in layers:
            layer.sequence_parallel = True


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that may run on a slice of the sequence (see replicated_on_slice)."""

    def __init__(self, dim: int, tp: TPGroup, *, eps: float, bias: bool):
        super().__init__(dim, eps=eps, bias=bias)
        self.tp, self.sequence_parallel = tp, tp.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, replicated_on_slice(self.weight, self),
                            replicated_on_slice(self.bias, self), self.eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that may run on a slice of the sequence (see replicated_on_slice)."""

    def __init__(self, dim: int, tp: TPGroup, *, eps: float):
        super().__init__(dim, eps=eps)
        self.tp, self.sequence_parallel = tp, tp.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, replicated_on_slice(self.weight, self), self.eps)


def _init_normal(weight: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        weight.normal_(mean=0.0, std=std)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features): each rank computes a slice of y.

    gather_output=False leaves y split on the last dimension, ready for a RowParallelLinear.
    Layers that read the same input (Llama's gate and up) enter the TP region once:
    `x = layer.region_input(x)`, then `layer(x, entered=True)` for each.
    """

    weight_split = Split.COLUMN

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = True,
                 gather_output: bool = False, init_std: float = 0.02):
        super().__init__()
        self.tp, self.gather_output, self.sequence_parallel = tp, gather_output, tp.sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local_out = _divide(out_features, tp.size, "output features")
        self.weight = mark_split(nn.Parameter(torch.empty(local_out, in_features)), self.weight_split)
        _init_normal(self.weight, init_std)
        self.bias = None
        if bias:
            self.bias = mark_split(nn.Parameter(torch.zeros(local_out)), Split.COLUMN)

    def region_input(self, x: torch.Tensor) -> torch.Tensor:
        """The TP region's input on every rank: the whole sequence gathered (sequence
        parallelism) or x itself; the backward sums the ranks' input gradients either way."""
        return gather_sequence(x, self.tp) if self.sequence_parallel else copy_to_tp(x, self.tp)

    def forward(self, x: torch.Tensor, entered: bool = False) -> torch.Tensor:
        y = F.linear(x if entered else self.region_input(x), self.weight, self.bias)
        return gather_from_tp(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); partial sums are all-reduced.

    input_is_parallel=True takes x already split on its last dimension (the output of a
    ColumnParallelLinear); otherwise each rank keeps its own slice of a replicated x.
    The bias is replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = True,
                 input_is_parallel: bool = True, init_std: float = 0.02):
        super().__init__()
        self.tp, self.input_is_parallel, self.sequence_parallel = tp, input_is_parallel, tp.sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local_in = _divide(in_features, tp.size, "input features")
        self.weight = mark_split(nn.Parameter(torch.empty(out_features, local_in)), Split.ROW)
        _init_normal(self.weight, init_std)
        self.bias = mark_split(nn.Parameter(torch.zeros(out_features)), Split.REPLICATED) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp)
        return self.region_output(F.linear(x, self.weight))

    def region_output(self, partial: torch.Tensor) -> torch.Tensor:
        """The ranks' partial sums -> their sum (this rank's sequence slice of it under sequence
        parallelism), plus the bias."""
        if self.sequence_parallel:
            y = reduce_scatter_sequence(partial, self.tp)  # (B, T / tp, out)
        else:
            y = reduce_from_tp(partial, self.tp)
        return y if self.bias is None else y + replicated_on_slice(self.bias, self)


def _zero_padding_rows(weight: torch.Tensor, vocab_size: int, vocab_start: int) -> None:
    """Rows past the real vocabulary are padding: keep them zero so they carry nothing."""
    first_pad = max(0, min(weight.shape[0], vocab_size - vocab_start))
    with torch.no_grad():
        weight[first_pad:].zero_()


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across TP ranks by row."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, tp: TPGroup, *, init_std: float = 0.02):
        super().__init__()
        self.tp, self.vocab_size, self.padded_vocab = tp, vocab_size, padded_vocab
        self.sequence_parallel = tp.sequence_parallel
        local = _divide(padded_vocab, tp.size, "padded vocabulary")
        self.vocab_start = tp.rank * local
        self.weight = mark_split(nn.Parameter(torch.empty(local, dim)), Split.VOCAB)
        _init_normal(self.weight, init_std)
        _zero_padding_rows(self.weight, vocab_size, self.vocab_start)

    def forward(self, ids: torch.Tensor | None = None, *, unembed: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """ids -> embeddings; or, with `unembed=hidden`, this rank's slice of the tied output
        logits; or, with `unembed=hidden, targets=labels`, the cross-entropy of those logits
        summed over the labelled tokens, without materialising them (`output_loss`).

        The tied output projection runs inside this forward on purpose: ZeRO-3 gathers a
        module's partitioned parameters only while that module's forward runs.
        """
        if unembed is not None:
            x = gather_sequence(unembed, self.tp) if self.sequence_parallel else copy_to_tp(unembed, self.tp)
            if targets is not None:
                return output_loss(x, self.weight, targets, self.vocab_size, self.tp)  # 0-dim
            return F.linear(x, self.weight)  # (..., V_pad / tp)
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        foreign = (local_ids < 0) | (local_ids >= self.weight.shape[0])  # rows another rank holds
        out = F.embedding(local_ids.masked_fill(foreign, 0), self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.tp)  # (B, T / tp, d)
        return reduce_from_tp(out, self.tp)


class VocabParallelHead(ColumnParallelLinear):
    """The untied output projection: a column-parallel linear whose rows are the padded vocab."""

    weight_split = Split.VOCAB

    def __init__(self, dim: int, vocab_size: int, padded_vocab: int, tp: TPGroup, *, init_std: float = 0.02):
        super().__init__(dim, padded_vocab, tp, bias=False, gather_output=False, init_std=init_std)
        self.vocab_size = vocab_size
        _zero_padding_rows(self.weight, vocab_size, tp.rank * self.weight.shape[0])

    def forward(self, x: torch.Tensor, entered: bool = False, *, targets: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's slice of the logits (..., V_pad / tp); with `targets`, the cross-entropy
        of those logits summed over the labelled tokens, without materialising them
        (`output_loss`), here inside the head's forward so that ZeRO-3 has gathered its weight."""
        if targets is None:
            return super().forward(x, entered)
        return output_loss(x if entered else self.region_input(x), self.weight, targets, self.vocab_size, self.tp)


def output_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                tp: TPGroup) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight^T over the real vocabulary, summed over the tokens
    whose target is not IGNORE_INDEX, computed in chunks (parallel/linear_cross_entropy.py);
    x: the TP region's input."""
    return linear_cross_entropy_sum(x, weight, targets, tp, vocab_size=vocab_size, ignore_index=IGNORE_INDEX)


def mask_vocab_padding(local_logits: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """Set the logits of padding tokens to -inf so they take no probability mass (and no grad)."""
    local = local_logits.shape[-1]
    first_pad = vocab_size - tp.rank * local
    if first_pad >= local:
        return local_logits
    pad = torch.arange(local, device=local_logits.device) >= max(first_pad, 0)
    return local_logits.masked_fill(pad, float("-inf"))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary; the full row never exists on one rank.

    Only per-token scalars cross the wire: the row max, the target logit and the sum of
    exponentials, three all-reduces of shape (tokens,).
    """

    @staticmethod
    def forward(ctx, local_logits, targets, tp, ignore_index):
        logits = local_logits.float()
        row_max = logits.max(dim=-1).values
        all_reduce_no_grad(row_max, tp, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)

        local_vocab = logits.shape[-1]
        local_targets = targets - tp.rank * local_vocab
        mine = (local_targets >= 0) & (local_targets < local_vocab) & (targets != ignore_index)
        safe_targets = local_targets.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) * mine
        all_reduce_no_grad(target_logit, tp)

        exp = shifted.exp()
        sum_exp = all_reduce_no_grad(exp.sum(dim=-1), tp)
        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit) * valid

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), safe_targets, mine, valid)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_targets, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, safe_targets.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def logits_loss(local_logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """Per-token cross-entropy (0 at IGNORE_INDEX) from materialised logits (..., V_pad / tp),
    padding masked: for a projection the fused `output_loss` cannot express (a LoRA head)."""
    return vocab_parallel_cross_entropy(mask_vocab_padding(local_logits, vocab_size, tp), targets, tp)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy (0 where targets == ignore_index), computed in fp32.

    local_logits: (..., V_pad / tp) this rank's slice; targets: (...) global token ids.
    """
    if tp.size == 1:
        flat = F.cross_entropy(local_logits.float().flatten(0, -2), targets.flatten(),
                               ignore_index=ignore_index, reduction="none")
        return flat.view(targets.shape)
    return _VocabParallelCrossEntropy.apply(local_logits, targets, tp, ignore_index)
