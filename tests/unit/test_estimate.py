"""`gptscale estimate`: every number against the model itself, a hand computation or a paper."""
import json
import math
import sys

import pytest
import torch

from gptscale import config
from gptscale.cli import main
from gptscale.config import ModelConfig
from gptscale.model.counting import count_parameters, parameters_per_tp_rank
from gptscale.model.gpt import GPT
from gptscale.model.stages import StageModule, stage_bounds, stage_layers
from gptscale.parallel.topology import TPGroup
from gptscale.presets import preset_names
from gptscale.scaling import formulas
from gptscale.scaling.estimate import (Cluster, Layout, StageTensors, estimate, layer_activation_bytes,
                                       model_state_memory, stage_tensors)

SMALL = ["model.vocab_size=4096", "model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=128",
         "data.synthetic=true", "train.micro_batch=2"]
LLAMA = ["model.preset=tiny-llama", *SMALL, "model.n_kv_head=2", "model.ffn_hidden=704"]
GPT2 = ["model.preset=tiny", *SMALL]


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("tp, pp", [(1, 1), (8, 4)])
def test_parameters_per_tp_rank_and_stage_add_up_to_the_model(name, tp, pp):
    cfg = ModelConfig.from_preset(name)
    if cfg.n_kv_head % tp or cfg.n_layer < pp:
        pytest.skip("layout impossible for this shape")
    stages = stage_tensors(cfg, tp, pp)
    tied_twice = cfg.padded_vocab_size(tp) // tp * cfg.n_embd if (pp > 1 and cfg.tie_embeddings) else 0
    assert sum(s.total for s in stages) - tied_twice == parameters_per_tp_rank(cfg, tp)
    assert sum(s.blocks for s in stages) == cfg.n_layer


@pytest.mark.parametrize("overrides", [GPT2, LLAMA])
@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2), (1, 3)])
def test_stage_tensors_equal_the_stage_modules_training_builds(overrides, tp, pp):
    cfg = config.load(None, overrides).model
    bounds = stage_bounds(cfg, pp, "parameters")
    with torch.device("meta"):
        layers = stage_layers(cfg, TPGroup.shape_only(tp))
        built = [sorted(p.numel() for p in StageModule(layers, [(start, stop)]).parameters())
                 for start, stop in zip(bounds, bounds[1:])]
    assert [sorted(s.numels) for s in stage_tensors(cfg, tp, pp)] == built


def test_whole_model_count_equals_the_model_on_meta():
    for overrides in (GPT2, LLAMA):
        cfg = config.load(None, overrides).model
        with torch.device("meta"):
            numels = sorted(p.numel() for p in GPT(cfg, TPGroup.shape_only(2)).parameters())
        assert sorted(stage_tensors(cfg, 2, 1)[0].numels) == numels


def test_published_counts_and_training_time():
    """Narayanan et al. 2021, Table 1 and section 5.1: GPT-3 175B has 174.6B parameters and
    trains on 300B tokens in 34 days on 1024 A100s at 140 TFLOP/s; the 1T model (1008.0B) on
    450B tokens in 84 days on 3072 GPUs at 163 TFLOP/s."""
    gpt3 = ModelConfig.from_preset("gpt3-175b")
    one_t = ModelConfig.from_preset("gpt-1t")
    assert round(count_parameters(gpt3).total / 1e9, 1) == 174.6
    assert round(count_parameters(one_t).total / 1e9, 1) == 1008.0
    assert round(formulas.narayanan_training_days(300e9, 174.6e9, 1024, 140)) == 34
    assert round(formulas.narayanan_training_days(450e9, 1008e9, 3072, 163)) == 84
    # The estimator also counts the attention FLOPs the paper's 8TP/(nX) leaves out (+2.7% here).
    for preset, tokens, devices, achieved, days in (("gpt3-175b", 300e9, 1024, 140, 34),
                                                    ("gpt-1t", 450e9, 3072, 163, 84)):
        cfg = config.load(None, [f"model.preset={preset}", "model.activation_checkpointing=true", "parallel.tp=8",
                                 "parallel.pp=8", "train.precision=bf16", "train.micro_batch=1"])
        e = estimate(cfg, Cluster(devices=devices, achieved_tflops=achieved), tokens=tokens)
        assert days <= e.train_time_s() / 86400 <= days * 1.04


def test_flops_with_recompute_by_hand():
    n, L, H, Q, T = 1000, 2, 4, 8, 16
    attention = 12 * L * H * Q * T
    assert formulas.training_flops_per_token(n, L, H, Q, T) == 6 * n + attention
    assert formulas.hardware_flops_per_token(n, L, H, Q, T, "full") == 8 * n + attention * 16 / 12
    assert formulas.hardware_flops_per_token(n, L, H, Q, T, "selective") == 6 * n + attention * 16 / 12
    assert formulas.hardware_flops_per_token(n, L, H, Q, T, "none") == 6 * n + attention


def test_korthikanti_table_2():
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B
    sbh = s * b * h
    assert formulas.korthikanti_layer_activation_bytes(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    assert formulas.korthikanti_layer_activation_bytes(s, b, h, a, t=8) == sbh * (10 + 24 / 8 + 5 * a * s / (h * 8))
    assert math.isclose(formulas.korthikanti_layer_activation_bytes(s, b, h, a, t=8, sequence_parallel=True,
                                                                    recompute="selective"), sbh * 34 / 8)
    # Section 5: sequence parallelism + selective recompute cut activations ~5x against TP alone.
    tp_only = formulas.korthikanti_layer_activation_bytes(s, b, h, a, t=8)
    both = formulas.korthikanti_layer_activation_bytes(s, b, h, a, t=8, sequence_parallel=True, recompute="selective")
    assert 4.5 < tp_only / both < 6
    assert formulas.korthikanti_layer_activation_bytes(s, b, h, a, t=8, recompute="full") == 2 * sbh


def test_bubble_fractions():
    assert formulas.pipeline_bubble_fraction(4, 8) == 3 / 11
    assert formulas.pipeline_bubble_fraction(4, 8, virtual_stages=2) == 1.5 / 9.5
    assert formulas.pipeline_bubble_fraction(1, 8) == 0


def _layout(**kw):
    base = dict(mode="zero3", tp=1, pp=1, dp=4, template="zero3", zero_stage=3, offload_params="none",
                offload_optimizer="none", precision="bf16", micro_batch=1, grad_accum=1, seq_len=16,
                recompute="none", persistence_threshold=0)
    return Layout(**{**base, **kw})


def test_zero3_model_states_by_hand():
    stage = StageTensors(numels=(10, 7), largest_module=10, decayed=(True, False), blocks=1, first=True, last=True)
    mem = model_state_memory(stage, _layout(), 0)
    part = 3 + 2  # ceil(10/4) + ceil(7/4): each tensor padded to a multiple of dp
    assert (mem.parameters, mem.master_weights, mem.gradients) == (2 * part, 4 * part, 4 * part)
    assert mem.optimizer_states == 8 * part + 2 * 4  # exp_avg, exp_avg_sq; a step tensor per group
    offloaded = model_state_memory(stage, _layout(offload_params="nvme", offload_optimizer="cpu"), 0)
    assert offloaded.model_states == 0
    assert offloaded.nvme == {"parameters": 2 * part}
    assert offloaded.host == {"master_weights": 4 * part, "optimizer_states": 8 * part + 8, "gradients": 4 * part,
                              "parameter_swap_buffers": 5 * 100_000_000 * 2}
    infinity = model_state_memory(stage, _layout(offload_params="nvme", offload_optimizer="nvme"), 0)
    # ZeRO-Infinity on NVMe: 2 + 4 + 8 + 4 (the gradient the optimizer swapper writes) = 18 bytes
    assert sum(infinity.nvme.values()) == 18 * part + 8
    assert infinity.host["gradients"] == 4 * part and infinity.host["optimizer_swap_buffers"] == 4 * part * 4


def test_zero1_model_states_by_hand():
    stage = StageTensors(numels=(10, 7, 3), largest_module=10, decayed=(True, True, False), blocks=1, first=True,
                         last=True)
    # two flat groups padded to multiples of 2 * dp = 8: 17 -> 24 and 3 -> 8, split 4 ways
    mem = model_state_memory(stage, _layout(zero_stage=1, mode="pipe", template="pipe_zero1", precision="fp32"), 0)
    assert (mem.parameters, mem.master_weights, mem.optimizer_states) == (4 * 32, 4 * 8, 8 * 8 + 2 * 4)
    assert (mem.gradients, mem.whole_gradients) == (0, 4 * 20)
    bf16 = model_state_memory(stage, _layout(zero_stage=1, mode="pipe", template="pipe_zero1"), 0)
    assert (bf16.parameters, bf16.gradients, bf16.master_weights) == (2 * 32, 4 * 32, 4 * 8)  # BF16_Optimizer


@pytest.mark.parametrize("overrides", [GPT2, LLAMA])
def test_activations_equal_what_the_model_saves_for_backward(overrides):
    """Every tensor autograd keeps from one forward (parameters and their views excluded), each
    storage once, against the estimate: equal bytes."""
    cfg = config.load(None, [*overrides, "data.seq_len=64", "train.micro_batch=3"])
    model = GPT(cfg.model)
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 4096, (3, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    e = estimate(cfg)
    scalars = 8  # the loss's int64 denominator (the fused head + loss keeps only its two gradients)
    assert e.memory[0].activations + e.memory[0].logits + scalars == sum(saved.values())


def test_recompute_and_sequence_parallel_shrink_activations():
    cfg = config.load(None, LLAMA).model
    none = layer_activation_bytes(cfg, _layout(tp=2, seq_len=128))
    assert layer_activation_bytes(cfg, _layout(tp=2, seq_len=128, recompute="selective")) < none
    assert layer_activation_bytes(cfg, _layout(tp=2, seq_len=128, sequence_parallel=True)) < none
    full = estimate(config.load(None, [*LLAMA, "model.activation_checkpointing=true"]))
    plain = estimate(config.load(None, LLAMA))
    assert full.memory[0].activations < plain.memory[0].activations / 2
    assert full.flops_hardware_per_token > plain.flops_hardware_per_token


def test_pipeline_first_stage_holds_p_micro_batches():
    cfg = config.load(None, [*LLAMA, "parallel.pp=2", "parallel.mode=pipe", "parallel.pipe_partition=blocks",
                             "train.grad_accum=8"])
    e = estimate(cfg)
    per_layer = layer_activation_bytes(cfg.model, e.layout)
    assert e.memory[0].activations >= 2 * 2 * per_layer  # 2 blocks x 2 micro-batches in flight
    assert e.memory[1].activations < 2 * 2 * per_layer  # the last stage: one
    assert math.isclose(e.bubble_fraction, 1 / 9)


def test_model_states_match_deepspeed_s_own_estimator():
    """DeepSpeed's estimate_zero3_model_states_mem_needs: 18 bytes per parameter / N on the
    device without offload (plus a largest-layer term), which gptscale's bf16 count equals."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = config.load(None, [*LLAMA, "train.precision=bf16", "model.vocab_size=4032"])  # divisible by 8
    e = estimate(cfg, Cluster(devices=8))
    total = sum(e.stages[0].numels)
    _, gpu, largest = estimate_zero3_model_states_mem_needs(total, 1, num_gpus_per_node=8, cpu_offload=False,
                                                           cpu_offload_params=False)
    padding = sum(-n % 8 for n in e.stages[0].numels) * 18 // 8
    assert abs(e.memory[0].model_states - (gpu - largest) - padding) <= 8 + 18


def test_estimate_cli_prints_text_and_json(capsys):
    assert main(["estimate", "--config", "configs/tiny.yaml", "--devices", "2", "--device-memory", "1",
                 "--peak-tflops", "0.1", "--tokens", "1e6"]) == 0
    text = capsys.readouterr().out
    assert "parameters:" in text and "fits in 1 GB" in text and "to train 1e+06 tokens" in text
    assert main(["estimate", "--config", "configs/tiny.yaml", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "gptscale.estimate/1"
    assert data["parameters"]["total"] == count_parameters(config.load("configs/tiny.yaml").model).total
    assert set(data["memory"]["per_stage"][0]) >= {"parameters", "gradients", "master_weights", "optimizer_states",
                                                   "activations", "peak", "host", "nvme"}


@pytest.mark.parametrize("args, message", [
    (["--set", "parallel.tp=3"], "not divisible by parallel.tp=3"),
    (["--search"], "--search needs --devices, --device-memory, --peak-tflops"),
    (["--set", "parallel.tp=2", "--devices", "3"], "world size 3 is not divisible"),
    (["--tokens", "-5"], "--tokens=-5.0 must be > 0"),
    (["--mfu", "2"], "--mfu=2.0 must be in (0, 1]"),
    (["--set", "train.ds_config=zero3", "--set", "parallel.pp=2"], "supports only ZeRO stage 0 or 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["estimate", "--config", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_estimate_imports_no_deepspeed():
    import subprocess

    code = ("import sys; from gptscale.scaling import estimate, search, report; "
            "print(any(m.split('.')[0] == 'deepspeed' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
