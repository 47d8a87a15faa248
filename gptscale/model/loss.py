"""The language-model loss: one function for the whole model and for its last pipeline stage.

Cross-entropy over the tokens whose label is not IGNORE_INDEX (prompt tokens in SFT,
padding), computed on this rank's vocabulary slice (`vocab_parallel_cross_entropy`), in fp32.
`GPT.forward` computes the summed loss fused with the output projection instead, in chunks
that never hold the whole batch's logits, and normalises it with `normalise_loss_sum`, and so
does pipe_zero3's last stage; the pipe mode's last stage returns logits to DeepSpeed's
PipelineEngine, whose loss function is `lm_loss`.

Normalisation. Without `num_valid_tokens` the loss is the mean over this micro-batch's
labelled tokens, as pretraining has always used: every micro-batch carries the same number
of labelled tokens there, so averaging the micro-batch means weights every token alike.
When micro-batches carry different numbers of labelled tokens (SFT with loss masks,
packing), that average over-weights the tokens of sparse micro-batches. Pass
`num_valid_tokens` = the labelled tokens of the whole optimizer step (every micro-batch on
every DP rank): then the loss is sum / that count, and the sum of these losses over the
step is exactly the mean over all its labelled tokens (torchtitan's `global_valid_tokens`).
A caller under DeepSpeed, which divides each micro-batch's loss by grad_accum and averages
gradients over DP, multiplies by grad_accum x dp to keep that sum.
"""
from __future__ import annotations

import torch

from gptscale.parallel.layers import IGNORE_INDEX, vocab_parallel_cross_entropy
from gptscale.parallel.topology import TPGroup


def lm_loss(local_logits: torch.Tensor, labels: torch.Tensor, tp: TPGroup,
            num_valid_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of the labelled tokens / their count in this micro-batch (default)
    or / `num_valid_tokens` (the step's global count).

    local_logits: (B, T, V_pad / tp) this rank's vocabulary slice; labels: (B, T) token ids.
    """
    per_token = vocab_parallel_cross_entropy(local_logits, labels, tp, ignore_index=IGNORE_INDEX)  # (B, T)
    return normalise_loss_sum(per_token.sum(), labels, num_valid_tokens)


def normalise_loss_sum(loss_sum: torch.Tensor, labels: torch.Tensor,
                       num_valid_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """`lm_loss` from the loss summed over the labelled tokens, however it was computed: the
    model's fused head + loss (`output_loss`) gives it without materialising the logits."""
    if num_valid_tokens is None:
        num_valid_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / num_valid_tokens
