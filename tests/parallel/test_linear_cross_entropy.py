"""The fused, chunked output projection + cross-entropy on 2 gloo ranks, inside the modules
that own the weight (the tied embedding, the untied head), with and without sequence
parallelism, against the dense fp64 math: loss, the hidden states' gradient (after the TP
region's all-reduce / reduce-scatter) and each rank's weight-slice gradient. The padded
vocabulary's padding rows lie on the last rank. One spawn for every case."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gptscale.parallel.layers import IGNORE_INDEX, VocabParallelEmbedding, VocabParallelHead
from gptscale.parallel.topology import TPGroup
from gptscale.testing.distributed import run_ranks

pytestmark = pytest.mark.dist
TP = 2
VOCAB, PADDED, D, B, T = 50, 64, 16, 3, 6  # rank 1 holds ids 32..63, of which 50..63 are padding


def case(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(PADDED, D, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX
    targets[1, 3], targets[2, 0] = VOCAB - 1, 31  # the last real id (rank 1), the last id of rank 0
    upstream = torch.tensor(0.37)  # backward multiplies it into the gradients computed in forward
    return hidden, weight, targets, upstream


def dense_reference(hidden, weight, targets, upstream):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = F.cross_entropy((h @ w[:VOCAB].T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    (loss * upstream.double()).backward()
    return loss.detach(), h.grad, w.grad


def rel_err(ours, ref):
    return ((ours.double() - ref).norm() / ref.norm()).item()


def count_all_reduces(fn):
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        fn()
    finally:
        dist.all_reduce = original
    return len(calls)


def fused_on_rank(tied, sequence_parallel, dtype):
    rank = dist.get_rank()
    tp = TPGroup(group=dist.group.WORLD, rank=rank, size=TP, sequence_parallel=sequence_parallel)
    hidden, weight, targets, upstream = case(dtype)
    ref_loss, ref_h, ref_w = dense_reference(hidden, weight, targets, upstream)
    if tied:
        module = VocabParallelEmbedding(VOCAB, PADDED, D, tp)
    else:
        module = VocabParallelHead(D, VOCAB, PADDED, tp)
    module.to(dtype)
    with torch.no_grad():  # padding rows non-zero on purpose: they must count for nothing anyway
        module.weight.copy_(weight.chunk(TP)[rank])
    own = slice(rank * T // TP, (rank + 1) * T // TP) if sequence_parallel else slice(None)
    x = hidden[:, own].clone().requires_grad_()  # under sequence parallelism, this rank's T / tp tokens
    loss = module(unembed=x, targets=targets) if tied else module(x, targets=targets)
    (loss * upstream).backward()
    return dict(loss=rel_err(loss.detach(), ref_loss), hidden=rel_err(x.grad, ref_h[:, own]),
                weight=rel_err(module.weight.grad, ref_w.chunk(TP)[rank]),
                padding_grad=module.weight.grad[max(0, VOCAB - rank * PADDED // TP):].abs().max().item()
                if rank == TP - 1 else 0.0)


def all_cases():
    from gptscale.parallel import linear_cross_entropy as module

    out, default_bytes = {}, module.CHUNK_LOGIT_BYTES
    for chunked in (False, True):  # the batch as one chunk / chunks of 5 tokens
        module.CHUNK_LOGIT_BYTES = 4 * (PADDED // TP) * 5 if chunked else default_bytes
        for tied in (True, False):
            for sp in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    out[(chunked, tied, sp, dtype)] = fused_on_rank(tied, sp, dtype)
    module.CHUNK_LOGIT_BYTES = default_bytes
    # Two all-reduces of per-token scalars per chunk (a chunk's softmax needs the whole row's log-sum-exp).
    tp = TPGroup(group=dist.group.WORLD, rank=dist.get_rank(), size=TP)
    head = VocabParallelHead(D, VOCAB, PADDED, tp)
    hidden, _, targets, _ = case(torch.float32)
    from gptscale.parallel.linear_cross_entropy import linear_cross_entropy_sum
    out["all_reduces"] = [count_all_reduces(lambda c=c: linear_cross_entropy_sum(
        hidden, head.weight, targets, tp, vocab_size=VOCAB, ignore_index=IGNORE_INDEX, chunk_tokens=c))
        for c in (1, 5, B * T)]
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(all_cases, TP, timeout=120)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_loss_on_two_ranks_equals_the_dense_math(ranks, chunked, tied, sequence_parallel, dtype, tol):
    for rank, res in enumerate(ranks):
        r = res[(chunked, tied, sequence_parallel, dtype)]
        assert r["loss"] < tol and r["hidden"] < tol and r["weight"] < tol, (rank, r)
        assert r["padding_grad"] == 0.0, (rank, r)


def test_the_loss_all_reduces_twice_per_chunk(ranks):
    for res in ranks:
        assert res["all_reduces"] == [2 * B * T, 2 * 4, 2]  # chunks of 1, 5 and B * T = 18 tokens
