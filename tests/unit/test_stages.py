"""The GPT as pipeline stage layers (no DeepSpeed): the same function and parameter names as
the dense model, the one partitioner, and the pipeline modes' config rules."""
import pytest
import torch

from gptscale import config
from gptscale.errors import ConfigError
from gptscale.runtime.ds_config import assemble
from gptscale.scaling.bubble import bubble_warning, theoretical_idle_fraction
from gptscale.model.gpt import GPT
from gptscale.model.loss import lm_loss
from gptscale.model.stages import StageModule, layers_with_parameters, stage_layers, tied_stages
from gptscale.parallel.topology import TPGroup

FAMILIES = {
    "gpt2": ["model.preset=tiny", "model.vocab_size=300", "model.n_layer=3", "model.n_embd=64", "model.block_size=32"],
    "llama": ["model.preset=tiny-llama", "model.vocab_size=300", "model.n_layer=3", "model.n_embd=64",
              "model.n_head=4", "model.n_kv_head=2", "model.block_size=32"],
}


def _run_layers(cfg, dense):
    """Build the stage layers, give them the dense model's weights by canonical name, run them in order."""
    layers = stage_layers(cfg.model, TPGroup.single())
    built, modules = {}, []
    for layer in layers:
        if layer.tie_key in built:
            module = built[layer.tie_key]
        else:
            module = layer.build(*layer.args)
            dense_params = dict(dense.named_parameters())
            for name, param in module.named_parameters():
                with torch.no_grad():
                    param.copy_(dense_params[layer.prefix + name])
            if layer.tie_key:
                built[layer.tie_key] = module
        modules.append((layer, module))
    return modules


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stage_layers_compute_the_dense_model(family):
    cfg = config.load(None, FAMILIES[family])
    torch.manual_seed(0)
    dense = GPT(cfg.model)
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.randint(0, 300, (2, 16))
    x = ids
    names = set()
    for layer, module in _run_layers(cfg, dense):
        x = layer.forward_fn(module, x) if layer.forward_fn else module(x)
        names |= {layer.prefix + n for n, _ in module.named_parameters()}
    assert names == {n for n, _ in dense.named_parameters()}  # canonical names, every parameter once
    assert torch.equal(x, dense(ids))
    assert torch.equal(lm_loss(x, labels, TPGroup.single()), lm_loss(dense(ids), labels, TPGroup.single()))
    # The dense model's own loss is the fused, chunked head + cross-entropy: the same value to fp32 rounding.
    torch.testing.assert_close(lm_loss(x, labels, TPGroup.single()), dense(ids, labels=labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stage_module_of_every_layer_computes_the_dense_model(family):
    """One stage holding both uses of GPT-2's tied embedding shares one module (the head use
    through its forward_fn); pipe_zero3 keeps two copies equal when the uses are on two stages."""
    cfg = config.load(None, FAMILIES[family])
    torch.manual_seed(0)
    dense = GPT(cfg.model)
    layers = stage_layers(cfg.model, TPGroup.single())
    stage = StageModule(layers, [(0, len(layers))])
    params, dense_params = stage.canonical_parameters(), dict(dense.named_parameters())
    assert params.keys() == dense_params.keys() and len(list(stage.parameters())) == len(params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(dense_params[name])
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(stage(ids), dense(ids))
    assert tied_stages(layers, [[(0, 2)], [(2, len(layers))]]) == ({"embed": [0, 1]} if family == "gpt2" else {})
    # Interleaved: chunk 1 of stage 0 runs the model's second half, and its output is the dense one.
    half = len(layers) // 2
    chunked = StageModule(layers, [(0, half), (half, len(layers))])
    chunked.load_state_dict(stage.state_dict())
    assert torch.equal(chunked(chunked(ids, chunk=0), chunk=1), dense(ids))
    assert chunked.canonical_parameters().keys() == params.keys()
    # With labels the head returns the fused loss sum (pipe_zero3's last stage): the dense loss.
    labels = ids.roll(-1, dims=1)
    loss_sum = chunked(chunked(ids, chunk=0), chunk=1, labels=labels)
    assert loss_sum.dim() == 0
    torch.testing.assert_close(loss_sum / labels.numel(), dense(ids, labels=labels), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_sum / labels.numel(), lm_loss(dense(ids), labels, TPGroup.single()), rtol=1e-6,
                               atol=0)


def test_a_tied_layer_is_stored_once():
    gpt2 = stage_layers(config.load(None, FAMILIES["gpt2"]).model, TPGroup.single())
    llama = stage_layers(config.load(None, FAMILIES["llama"]).model, TPGroup.single())
    assert gpt2[0].tie_key == gpt2[-1].tie_key == "embed" and gpt2[-1].forward_fn is not None
    assert layers_with_parameters(gpt2) == list(range(len(gpt2) - 1))
    assert layers_with_parameters(llama) == list(range(len(llama)))


def test_zero_stage_two_or_three_is_refused_with_pipeline_stages():
    cfg = config.load(None, ["parallel.pp=2", "train.ds_config=zero3"])
    with pytest.raises(ConfigError, match="uses ZeRO stage 3, but parallel.mode=pipe .* supports only ZeRO stage 0 "
                                          "or 1.*use train.ds_config=pipe_zero1"):
        assemble(cfg, 1, on_gpu=False)
    default = assemble(config.load(None, ["parallel.pp=2", "train.precision=bf16"]), 2, on_gpu=False)
    assert default["zero_optimization"]["stage"] == 1
    assert default["data_types"] == {"grad_accum_dtype": "fp32"}  # bf16 + PP + ZeRO-1 needs fp32 accumulation
    assert assemble(config.load(None, ["parallel.pp=2", "train.ds_config=pipe_zero0"]), 1, False)[
        "zero_optimization"]["stage"] == 0
    zero1_inside_stages = config.load(None, ["parallel.mode=pipe_zero3", "parallel.pp=2", "train.ds_config=pipe_zero1"])
    with pytest.raises(ConfigError, match="parallel.mode=pipe_zero3 partitions parameters with ZeRO stage 3"):
        assemble(zero1_inside_stages, 1, on_gpu=False)


def test_bubble_theory_and_warning():
    assert theoretical_idle_fraction(2, 2) == pytest.approx(1 / 3)
    assert theoretical_idle_fraction(4, 1) == pytest.approx(3 / 4)
    assert theoretical_idle_fraction(1, 8) == 0.0
    assert bubble_warning(config.load(None, ["parallel.pp=4", "train.grad_accum=4"])) is None
    warning = bubble_warning(config.load(None, ["parallel.pp=4", "train.grad_accum=2"]))
    assert "train.grad_accum=2 micro-batches < parallel.pp=4 stages: 60% of every step is pipeline bubble" in warning


def test_an_accelerate_config_with_another_zero_stage_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match="the accelerate config asks for ZeRO stage 2 but train.ds_config 'zero3' "
                                          "uses stage 3"):
        assemble(config.load(None, []), 1, on_gpu=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert assemble(config.load(None, []), 1, on_gpu=False)["zero_optimization"]["stage"] == 3


def test_the_partitioner_cuts_where_deepspeed_did():
    """One partitioner for both pipeline modes; it keeps DeepSpeed 0.19's balanced-partition rule,
    so stage boundaries (and which layers each stage builds from its seed) did not move."""
    import random

    from deepspeed.runtime.utils import partition_balanced as deepspeed_partition

    from gptscale.model.stages import partition_balanced

    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.choice([0, 1, rng.randint(0, 10 ** rng.randint(1, 9))]) for _ in range(rng.randint(1, 24))]
        parts = rng.randint(1, 8)
        assert partition_balanced(weights, parts) == deepspeed_partition(weights, parts), (weights, parts)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stage_bounds_by_parameters_and_by_blocks(family):
    from gptscale.model.stages import stage_bounds

    cfg = config.load(None, [*FAMILIES[family], "model.n_layer=6"]).model
    layers = stage_layers(cfg, TPGroup.single())
    blocks = stage_bounds(cfg, 3, "blocks")
    assert blocks[0] == 0 and blocks[-1] == len(layers)
    per_stage = [sum(layer.is_block for layer in layers[a:b]) for a, b in zip(blocks, blocks[1:])]
    assert per_stage == [2, 2, 2]
    by_params = stage_bounds(cfg, 2, "parameters")
    with torch.device("meta"):
        counts = [sum(p.numel() for p in layer.make().parameters()) for layer in layers]
    halves = [sum(counts[a:b]) for a, b in zip(by_params, by_params[1:])]
    # Balanced: moving the cut by one layer either way would not make the stages more equal.
    cut = by_params[1]
    for moved in (cut - 1, cut + 1):
        other = [sum(counts[:moved]), sum(counts[moved:])]
        assert max(halves) - min(halves) <= max(other) - min(other)


def test_a_micro_batch_loss_weighted_by_the_global_token_count():
    """SFT masks leave micro-batches with different numbers of labelled tokens: per-micro-batch
    means would weight their tokens unequally; sum / global count weights every token alike."""
    from gptscale.parallel.layers import IGNORE_INDEX

    torch.manual_seed(0)
    logits = torch.randn(4, 8, 300)
    labels = torch.randint(0, 300, (4, 8))
    labels[0, :7] = IGNORE_INDEX  # micro-batch 0 keeps 1 + 8 labelled tokens, micro-batch 1 all 16
    tp = TPGroup.single()
    whole = lm_loss(logits, labels, tp)  # the mean over every labelled token of the step
    count = (labels != IGNORE_INDEX).sum()
    micro = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    weighted = sum(lm_loss(x, y, tp, num_valid_tokens=count) for x, y in micro)
    assert abs(weighted - whole) < 1e-5  # fp32 cross-entropy
    averaged = sum(lm_loss(x, y, tp) for x, y in micro) / 2  # what per-micro-batch means give
    assert abs(averaged - whole) > 1e-3
    # Default: this micro-batch's own mean, exactly the expression pretraining always used.
    per_token = torch.nn.functional.cross_entropy(logits[:2].flatten(0, 1), labels[:2].flatten(), reduction="none",
                                                  ignore_index=IGNORE_INDEX)
    assert torch.equal(lm_loss(*micro[0], tp), per_token.sum() / (labels[:2] != IGNORE_INDEX).sum())


def test_the_start_up_line_names_each_stage_s_layers():
    from gptscale.model.stages import describe_stages, stage_bounds

    gpt2 = config.load(None, [*FAMILIES["gpt2"], "model.n_layer=4"]).model
    layers = stage_layers(gpt2, TPGroup.single())
    assert describe_stages(layers, stage_bounds(gpt2, 2, "blocks")) == (
        "stage 0: embedding, positions, blocks 0-1 | stage 1: blocks 2-3, final norm, head (tied embedding)")
    llama = config.load(None, FAMILIES["llama"]).model
    assert describe_stages(stage_layers(llama, TPGroup.single()), stage_bounds(llama, 3, "blocks")) == (
        "stage 0: embedding, positions, block 0 | stage 1: block 1 | stage 2: block 2, final norm, head")
