"""Assemble the DeepSpeed config from a template (DeepSpeed-only sections) and the run config
(every number that the run config owns). Nothing has to agree by hand."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from gptscale.config import ConfigError, RunConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
OWNED_BY_RUN_CONFIG = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16", "data_types")


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; choose a template in {TEMPLATE_DIR} "
                          f"({', '.join(sorted(p.stem for p in TEMPLATE_DIR.glob('*.json')))}) or give a JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def template_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        return path
    return TEMPLATE_DIR / f"{name}.json"


def _substitute(node, values: dict[str, str]):
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace("${" + key + "}", value)
    return node


DEFAULT_TEMPLATE = {"zero3": "zero3", "pipe": "pipe_zero1", "pipe_zero3": "zero3"}
MAX_ZERO_STAGE = {"pipe": 1}  # DeepSpeed's PipelineEngine asserts ZeRO stage < 2
MIN_ZERO_STAGE = {"zero3": 3, "pipe_zero3": 3}


def template_name(cfg: RunConfig) -> str:
    return cfg.train.ds_config or DEFAULT_TEMPLATE[cfg.parallel.resolved_mode]


def _check_zero_stage(template: dict, name: str, cfg: RunConfig) -> None:
    mode = cfg.parallel.resolved_mode
    stage = template.get("zero_optimization", {}).get("stage", 0)
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by `accelerate launch`
    if launcher_stage not in (None, "", str(stage)):
        raise ConfigError(f"the accelerate config asks for ZeRO stage {launcher_stage} but train.ds_config {name!r} "
                          f"uses stage {stage}; gptscale takes DeepSpeed settings from the run config only, so make "
                          f"the accelerate config's zero_stage {stage} (or choose another train.ds_config)")
    if stage < MIN_ZERO_STAGE.get(mode, 0):
        raise ConfigError(f"train.ds_config {name!r} uses ZeRO stage {stage}, but parallel.mode={mode} partitions "
                          f"parameters with ZeRO stage 3; use a stage 3 template (train.ds_config=zero3)")
    if stage > MAX_ZERO_STAGE.get(mode, 3):
        raise ConfigError(
            f"train.ds_config {name!r} uses ZeRO stage {stage}, but parallel.mode={mode} (parallel.pp="
            f"{cfg.parallel.pp}) runs DeepSpeed's PipelineEngine, which supports only ZeRO stage 0 or 1 (it shards "
            f"no gradients or parameters across pipeline micro-batches); use train.ds_config=pipe_zero1, or "
            f"parallel.pp=1 for ZeRO-3")


def load_template(cfg: RunConfig) -> dict:
    """The run's DeepSpeed template, checked against the run config (cheap: call it before
    starting distributed work, so a bad choice fails at once on every rank)."""
    name = template_name(cfg)
    template = _load_json(template_path(name), "train.ds_config")
    clashes = [k for k in OWNED_BY_RUN_CONFIG if k in template]
    if clashes:
        raise ConfigError(f"train.ds_config {name!r} sets {', '.join(clashes)}, which the run config owns "
                          f"(train.micro_batch, grad_accum, lr, grad_clip, precision); remove them from the template")
    _check_zero_stage(template, name, cfg)
    return template


def assemble(cfg: RunConfig, dp_size: int, on_gpu: bool) -> dict:
    """The complete DeepSpeed config for this run on `dp_size` data-parallel replicas."""
    t = cfg.train
    ds = _substitute(copy.deepcopy(load_template(cfg)), {"nvme_path": t.nvme_path})
    offloads_optimizer = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    ds.update({
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
            # Without CUDA and without offload, DeepSpeed's fused Adam is unavailable: use torch's.
            **({} if on_gpu or offloads_optimizer else {"torch_adam": True})}},
    })
    if t.precision != "fp32":
        ds.update(_load_json(TEMPLATE_DIR / "precision" / f"{t.precision}.json", "precision template"))
    return ds
