"""The fused, chunked output projection + cross-entropy (gradients computed in the forward
pass) at tp=1 against the dense math in fp64 (summed loss and both gradients), the model's
fused loss against its logits path, and the memory claim: no saved tensor holds (tokens x
vocabulary) elements. (tp=2, sequence
parallelism and tied/untied modules: tests/parallel/test_linear_cross_entropy.py.)"""
import pytest
import torch
import torch.nn.functional as F

from gptscale.model.loss import lm_loss
from gptscale.parallel.layers import IGNORE_INDEX, vocab_parallel_cross_entropy
from gptscale.parallel.linear_cross_entropy import linear_cross_entropy_sum
from gptscale.parallel.topology import TPGroup
from tests.unit.test_model import model_and_batch

VOCAB, PADDED, D, TOKENS = 50, 64, 16, 37


def problem(dtype, seed=0):
    """Hidden states, a padded weight (padding rows non-zero: they must still count for nothing),
    targets with ignored tokens and the vocabulary's last id, an upstream gradient that is not 1
    (backward multiplies it into the gradients computed in forward)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, D, generator=g)
    weight = torch.randn(PADDED, D, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    targets[[3, 17]] = IGNORE_INDEX
    targets[5] = VOCAB - 1
    upstream = torch.tensor(0.37)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def dense_reference(hidden, weight, targets, upstream):
    """Full fp64 logits over the real vocabulary, F.cross_entropy: summed loss, d/d hidden, d/d weight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w[:VOCAB].T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (loss * upstream.double()).backward()
    return loss.detach(), h.grad, w.grad


def fused(hidden, weight, targets, upstream, chunk_tokens):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, targets, TPGroup.single(), vocab_size=VOCAB, ignore_index=IGNORE_INDEX,
                                    chunk_tokens=chunk_tokens)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def rel_err(ours, ref):
    return ((ours.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
# chunks with an uneven last one; one chunk of exactly the batch; a chunk larger than the batch
@pytest.mark.parametrize("chunk_tokens", [5, 37, 1000])
def test_fused_loss_and_gradients_equal_the_dense_math(dtype, tol, chunk_tokens):
    hidden, weight, targets, upstream = problem(dtype)
    loss, grad_h, grad_w = fused(hidden, weight, targets, upstream, chunk_tokens)
    ref_loss, ref_h, ref_w = dense_reference(hidden, weight, targets, upstream)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad_h.dtype == grad_w.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) < tol * ref_loss.item()
    assert grad_h[[3, 17]].eq(0).all()  # ignored tokens: no gradient
    assert rel_err(grad_h, ref_h) < tol
    assert rel_err(grad_w, ref_w) < tol
    assert grad_w[VOCAB:].eq(0).all()  # padding rows: no gradient at all


def test_a_frozen_weight_gets_no_gradient_and_costs_no_weight_product():
    hidden, weight, targets, _ = problem(torch.float32)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy_sum(h, weight, targets, TPGroup.single(), vocab_size=VOCAB,
                             ignore_index=IGNORE_INDEX, chunk_tokens=8).backward()
    assert weight.grad is None and h.grad is not None


def saved_numels(fn):
    """Element counts of every tensor autograd saves while `fn` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_no_saved_tensor_holds_the_batch_s_logits():
    tokens, vocab, d = 512, 1000, 32  # d < tokens, so the (saved) weight is smaller than any logits
    hidden = torch.randn(tokens, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    logits_numel = tokens * vocab

    unfused = saved_numels(lambda: vocab_parallel_cross_entropy(F.linear(hidden, weight), targets, TPGroup.single()))
    assert max(unfused) >= logits_numel  # the probe sees the logits where they are saved
    # Kept from forward to backward: the two gradients, the sizes of the hidden states and the weight.
    chunk = saved_numels(lambda: linear_cross_entropy_sum(hidden, weight, targets, TPGroup.single(),
                                                          vocab_size=vocab, ignore_index=IGNORE_INDEX, chunk_tokens=64))
    assert max(chunk) < logits_numel // 8 and sum(chunk) == hidden.numel() + weight.numel()


def test_evaluation_computes_no_gradients():
    hidden, weight, targets, _ = problem(torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    args = dict(vocab_size=VOCAB, ignore_index=IGNORE_INDEX, chunk_tokens=8)
    with torch.no_grad():
        assert saved_numels(lambda: linear_cross_entropy_sum(h, w, targets, TPGroup.single(), **args)) == []
        evaluated = linear_cross_entropy_sum(h, w, targets, TPGroup.single(), **args)
    assert evaluated.item() == linear_cross_entropy_sum(h, w, targets, TPGroup.single(), **args).item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied embedding / untied head
def test_the_model_s_fused_loss_equals_its_logits_loss(family):
    model, ids = model_and_batch(family, vocab_size=300)  # padded to 384: 84 padding rows
    labels = ids.roll(-1, dims=1)
    labels[0, :5] = IGNORE_INDEX
    fused_loss = model(ids, labels=labels)
    fused_loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits_loss = lm_loss(model(ids), labels, model.tp)
    logits_loss.backward()
    assert abs(fused_loss.item() - logits_loss.item()) <= 1e-6 * logits_loss.item()
    for name, p in model.named_parameters():
        assert rel_err(fused_grads[name], p.grad.double()) < 1e-5, name
    # with num_valid_tokens: the sum over the labelled tokens / that count, as lm_loss
    count = torch.tensor(100)
    assert torch.allclose(model(ids, labels=labels, num_valid_tokens=count),
                          lm_loss(model(ids), labels, model.tp, num_valid_tokens=count), rtol=1e-6)
