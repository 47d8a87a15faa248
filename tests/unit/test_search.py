"""`gptscale estimate --search`: never proposes what `gptscale train` refuses, explains the rest."""
import pytest

from gptscale import config, ds_templates
from gptscale.cli import main
from gptscale.errors import UserError
from gptscale.launch import LaunchEnv, check_tp_within_node
from gptscale.parallel.topology import RankLayout
from gptscale.scaling.estimate import Cluster
from gptscale.scaling.search import search

TINY = ["model.preset=tiny", "model.n_layer=4", "data.synthetic=true", "train.micro_batch=2", "train.grad_accum=2"]
LLAMA_GQA = ["model.preset=tiny-llama", "model.n_layer=6", "model.n_head=8", "model.n_kv_head=2",
             "data.synthetic=true", "train.micro_batch=1", "train.grad_accum=4"]


def _training_refuses(base: list[str], overrides: dict, devices: int, per_node: int, path=None) -> str | None:
    """What `gptscale train` checks before any engine starts, through its own entry points:
    the config loaded from --set strings, the DeepSpeed template against the mode, the rank
    layout for the world, TP groups within a node (NCCL)."""
    try:
        cfg = config.load(path, [*base, *(f"{k}={v}" for k, v in overrides.items())])
        ds_templates.load_template(cfg)
        RankLayout.for_world(devices, cfg.parallel)
        launch = LaunchEnv("torchrun", rank=0, world_size=devices, local_rank=0,
                           local_world_size=min(per_node, devices))
        check_tp_within_node(cfg.parallel.tp, launch, "nccl")
    except UserError as err:
        return str(err)
    return None


@pytest.mark.parametrize("model", [TINY, LLAMA_GQA])
@pytest.mark.parametrize("devices, per_node, memory_gb", [(1, 1, 1.0), (4, 4, 0.05), (8, 4, 0.02)])
def test_every_proposal_is_accepted_by_training(model, devices, per_node, memory_gb):
    cfg = config.load(None, model)
    result = search(cfg, Cluster(devices=devices, devices_per_node=per_node, device_memory_gb=memory_gb,
                                 peak_tflops=100.0))
    assert result.candidates
    for cand in result.feasible:
        assert _training_refuses(model, cand.overrides, devices, per_node) is None, cand.overrides
        assert cand.estimate.worst.peak <= memory_gb * 1e9
        assert cand.overrides["train.micro_batch"] * cand.overrides["train.grad_accum"] * \
            cand.overrides["parallel.dp"] == result.global_batch
    steps = [c.estimate.step.total for c in result.feasible]
    assert steps == sorted(steps)
    for cand in result.refused:  # each refusal by training's checks is one a training run would give too
        if not cand.reason.startswith(("needs ", "global batch")):
            assert _training_refuses(model, cand.overrides, devices, per_node) == cand.reason


def test_search_proposes_every_mode_and_explains_refusals():
    result = search(config.load(None, LLAMA_GQA), Cluster(devices=8, devices_per_node=4, device_memory_gb=0.05,
                                                          peak_tflops=100.0))
    modes = {c.overrides["parallel.mode"] for c in result.feasible}
    assert modes == {"zero3", "pipe", "pipe_zero3"}
    reasons = " | ".join(reason for reason, _, _ in result.reasons())
    assert "model.n_kv_head=2 is not divisible by parallel.tp=4" in reasons
    assert "GB per device > 0.05 GB" in reasons
    assert "cannot use parallel.pp" in reasons
    # a TP group larger than a node: refused as training refuses it on GPUs
    wide = search(config.load(None, ["model.preset=tiny", "data.synthetic=true", "train.micro_batch=1"]),
                  Cluster(devices=8, devices_per_node=2, device_memory_gb=1, peak_tflops=100.0))
    assert any("tensor-parallel groups span nodes" in reason for reason, _, _ in wide.reasons())


def test_a_model_that_fits_nowhere_is_explained(capsys):
    code = main(["estimate", "--set", "model.preset=gpt2-1.3b", "--set", "train.precision=bf16", "--devices", "2",
                 "--device-memory", "0.5", "--peak-tflops", "989", "--search", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 2
    assert "0 feasible" in out and "no layout fits" in out
    assert "GB per device > 0.5 GB" in out


def test_search_cli_lists_the_best_layout_as_overrides(capsys):
    assert main(["estimate", "--config", "configs/tiny.yaml", "--devices", "4", "--device-memory", "1",
                 "--peak-tflops", "1", "--search", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "best as overrides: --set parallel.mode=" in out
    best = out.split("best as overrides: ")[1].splitlines()[0].replace("--set ", "").split()
    assert _training_refuses([], dict(item.split("=", 1) for item in best), 4, 8, "configs/tiny.yaml") is None
