"""LoRA on the parallel linears, on one process (TP=2/4 vs TP=1: tests/parallel/test_tensor_parallel.py)."""
import pytest
import torch

from gptscale.config import LoRAConfig, load
from gptscale.convert.tp import canonical_layout
from gptscale.errors import ConfigError
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import Split, split_table
from gptscale.parallel.lora import add_lora, adapter_parameters, initial_a, merge_lora, unmerge_lora
from tests.unit.test_model import small

FAMILIES = {"gpt2": "qkv,proj,mlp", "llama": "qkv,proj,mlp,head"}


def adapted(family, seed=0, **lora):
    torch.manual_seed(seed)
    model = GPT(small(family))
    names = add_lora(model, LoRAConfig(targets=FAMILIES[family], **lora), seed=7)
    return model, names


@pytest.mark.parametrize("family", FAMILIES)
def test_at_init_the_adapted_model_computes_its_base(family):
    torch.manual_seed(0)
    base = GPT(small(family))
    model, _ = adapted(family)
    ids = torch.randint(0, base.cfg.vocab_size, (2, 12))
    assert torch.equal(model(ids), base(ids))
    assert all(p.abs().sum() > 0 for n, p in adapter_parameters(model).items() if ".lora_A." in n)
    assert all(p.abs().sum() == 0 for n, p in adapter_parameters(model).items() if ".lora_B." in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_split_tags_and_names(family):
    model, names = adapted(family)
    n_layer = model.cfg.n_layer
    per_block = 5 if family == "llama" else 4
    assert len(names) == per_block * n_layer + (family == "llama")
    table = split_table(model)
    assert table["blocks.0.attn.qkv.lora_A.weight"] is Split.REPLICATED
    assert table["blocks.0.attn.qkv.lora_B.weight"] is Split.COLUMN
    assert table["blocks.0.attn.proj.lora_A.weight"] is Split.ROW
    assert table["blocks.0.attn.proj.lora_B.weight"] is Split.REPLICATED
    if family == "llama":
        assert table["head.lora_B.weight"] is Split.VOCAB
    shapes, meta_table = canonical_layout(model.cfg, LoRAConfig(targets=FAMILIES[family]))
    assert {n for n in shapes if ".lora_" in n} == set(adapter_parameters(model))
    assert all(meta_table[n] is table[n] for n in table)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_forward_equals_adapter_forward(family):
    model, _ = adapted(family, rank=4, alpha=8.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            p.normal_(std=0.05)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with_adapters = model.full_logits(model(ids))
    before = {n: p.clone() for n, p in model.named_parameters()}
    merge_lora(model)
    merged = model.full_logits(model(ids))
    assert (merged - with_adapters).abs().max().item() <= 1e-5
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    unmerge_lora(model)
    assert (model.full_logits(model(ids)) - with_adapters).abs().max().item() <= 1e-5
    assert all((before[n] - p).abs().max().item() <= 1e-6 for n, p in model.named_parameters())


def test_initial_a_does_not_depend_on_anything_but_seed_and_name():
    a = initial_a(8, 64, 3, "blocks.0.attn.qkv")
    assert torch.equal(a, initial_a(8, 64, 3, "blocks.0.attn.qkv"))
    assert not torch.equal(a, initial_a(8, 64, 3, "blocks.1.attn.qkv"))
    assert not torch.equal(a, initial_a(8, 64, 4, "blocks.0.attn.qkv"))
    assert a.abs().max() <= 1 / 8


def test_a_target_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="'gate' matches no layer"):
        add_lora(GPT(small("gpt2")), LoRAConfig(targets="qkv,gate"), seed=0)
    with pytest.raises(ConfigError, match="'head' matches no layer"):
        add_lora(GPT(small("gpt2")), LoRAConfig(targets="head"), seed=0)


@pytest.mark.parametrize("override, message", [
    ("finetune.lora.rank=0", "finetune.lora.rank=0 must be >= 1"),
    ("finetune.lora.rank=-2", "finetune.lora.rank=-2 must be >= 1"),
    ("finetune.lora.targets=qkv,attn", "'attn' is not a target"),
    ("finetune.lora.targets=' , '", "names no target"),
    ("finetune.lora.dropout=1.0", "finetune.lora.dropout=1.0 must be in"),
    ("finetune.method=qlora", "finetune.method='qlora' is unknown"),
])
def test_bad_lora_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(None, [override])
