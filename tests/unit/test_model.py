"""The GPT against an explicit, loop-free-of-tricks reference, and its invariants at tp=1."""
import math

import pytest
import torch
import torch.nn.functional as F

from gptscale.config import ModelConfig
from gptscale.errors import ConfigError
from gptscale.model.generate import generate, pick_next_token
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import IGNORE_INDEX, Split, split_table

SMALL = {
    "gpt2": dict(family="gpt2", vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32),
    "llama": dict(family="llama", vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=32, ffn_hidden=48),
}


def small(family, **overrides):
    return ModelConfig.from_preset("tiny", **{**SMALL[family], **overrides})


def model_and_batch(family, seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(small(family, **overrides))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    return model, ids


def reference_logits(model, ids):
    """Written from the papers, not from gpt.py: explicit per-head attention, per-pair RoPE."""
    cfg = model.cfg
    B, T = ids.shape
    hd, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head

    def norm(module, x):
        if cfg.uses_rmsnorm:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * module.weight
        return F.layer_norm(x, (cfg.n_embd,), module.weight, module.bias, cfg.norm_eps)

    def rope(x):  # x: (T, hd); rotate pair (i, i + hd/2) by pos * theta^(-2i/hd)
        out = x.clone()
        for i in range(hd // 2):
            angle = torch.arange(T, dtype=torch.float32) * cfg.rope_theta ** (-2 * i / hd)
            a, b = x[:, i], x[:, i + hd // 2]
            out[:, i] = a * angle.cos() - b * angle.sin()
            out[:, i + hd // 2] = b * angle.cos() + a * angle.sin()
        return out

    x = model.embed.weight[ids]
    if not cfg.uses_rope:
        x = x + model.pos_embed[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block in model.blocks:
        h = norm(block.norm1, x)
        qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias)
        rows = qkv.view(B, T, cfg.n_kv_head, group + 2, hd)  # documented layout: per kv group [q.., k, v]
        heads = []
        for b in range(B):
            per_head = []
            for head in range(cfg.n_head):
                g, j = divmod(head, group)
                q, k, v = rows[b, :, g, j], rows[b, :, g, group], rows[b, :, g, group + 1]
                if cfg.uses_rope:
                    q, k = rope(q), rope(k)
                scores = (q @ k.T / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
                per_head.append(scores.softmax(-1) @ v)
            heads.append(torch.cat(per_head, dim=-1))
        x = x + F.linear(torch.stack(heads), block.attn.proj.weight, block.attn.proj.bias)
        h = norm(block.norm2, x)
        mlp = block.mlp
        if cfg.uses_gated_mlp:
            inner = F.silu(F.linear(h, mlp.gate.weight)) * F.linear(h, mlp.up.weight)
        else:
            inner = F.gelu(F.linear(h, mlp.up.weight, mlp.up.bias), approximate="tanh")
        x = x + F.linear(inner, mlp.down.weight, mlp.down.bias)
    x = norm(model.norm_f, x)
    head = model.embed.weight if cfg.tie_embeddings else model.head.weight
    return (x @ head.T)[..., :cfg.vocab_size]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_explicit_reference(family):
    model, ids = model_and_batch(family)
    with torch.no_grad():
        ours = model.full_logits(model(ids))
        ref = reference_logits(model, ids)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_table_tags(family):
    table = split_table(GPT(small(family)))
    assert table["embed.weight"] is Split.VOCAB
    assert table["blocks.0.attn.qkv.weight"] is Split.COLUMN
    assert table["blocks.0.attn.proj.weight"] is Split.ROW
    assert table["blocks.0.mlp.down.weight"] is Split.ROW
    assert table["norm_f.weight"] is Split.REPLICATED
    if family == "gpt2":
        assert table["blocks.0.attn.proj.bias"] is Split.REPLICATED and "head.weight" not in table
    else:
        assert table["head.weight"] is Split.VOCAB and table["blocks.0.mlp.gate.weight"] is Split.COLUMN


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_vocab_padding_never_changes_the_loss(family):
    padded, ids = model_and_batch(family, vocab_pad_multiple=64)
    unpadded = GPT(small(family, vocab_pad_multiple=1))
    assert padded.padded_vocab == 320 and unpadded.padded_vocab == 300
    state = {k: v[:300] if v.shape[:1] == (320,) else v for k, v in padded.state_dict().items()}
    unpadded.load_state_dict(state)
    loss_p, loss_u = padded(ids, labels=ids), unpadded(ids, labels=ids)
    loss_p.backward()
    loss_u.backward()
    assert abs(loss_p.item() - loss_u.item()) < 1e-6
    for (name, p), u in zip(padded.named_parameters(), unpadded.parameters()):
        assert torch.allclose(p.grad[:u.shape[0]], u.grad, atol=1e-6), name
        if p.shape != u.shape:
            assert p.grad[300:].abs().max() == 0 and p[300:].abs().max() == 0, name


def test_ignore_index_tokens_carry_no_loss():
    model, ids = model_and_batch("gpt2")
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    logits = model.full_logits(model(ids))
    expected = F.cross_entropy(logits[:, 6:].reshape(-1, 300), ids[:, 6:].reshape(-1))
    assert abs(model(ids, labels=labels).item() - expected.item()) < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_changes_memory_not_maths(family):
    plain, ids = model_and_batch(family)
    ckpt = GPT(small(family, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        m(ids, labels=ids).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_prefill_in_chunks_equals_full_forward(family):
    model, ids = model_and_batch(family)
    model.eval()
    with torch.no_grad():
        full = model.full_logits(model(ids))
        cache = model.new_kv_cache(2, 16)
        chunks = [model.full_logits(model(ids[:, a:b], cache=cache)) for a, b in ((0, 5), (5, 6), (6, 16))]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_equals_recomputing_everything(family):
    model, ids = model_and_batch(family)
    prompt = ids[:, :4]
    out = generate(model, prompt, 10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model.full_logits(model(seq))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_controls():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    greedy = pick_next_token(logits, temperature=0)
    assert greedy.flatten().tolist() == [1] * 4
    assert torch.equal(pick_next_token(logits, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    draws = pick_next_token(logits.repeat(100, 1), top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == {1, 3}  # top-2 only, both seen
    model, ids = model_and_batch("llama")
    a = generate(model, ids[:, :3], 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids[:, :3], 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (2, 11)
    with pytest.raises(ValueError, match="temperature=-1"):
        pick_next_token(logits, temperature=-1)


def test_stop_token_ends_generation_early():
    model, ids = model_and_batch("gpt2")
    first = generate(model, ids[:1, :3], 1, temperature=0)[0, -1].item()
    out = generate(model, ids[:1, :3], 10, temperature=0, stop_token=first)
    assert out.shape == (1, 4)


def test_too_long_inputs_are_refused():
    model, ids = model_and_batch("gpt2")
    with pytest.raises(ValueError, match="exceeds model.block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds model.block_size=32"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 5)


def test_tp_degree_is_checked_by_the_model():
    from gptscale.parallel.topology import TPGroup
    with pytest.raises(ConfigError, match="model.n_head=4 is not divisible by parallel.tp=3"):
        GPT(small("gpt2"), TPGroup.shape_only(3))
