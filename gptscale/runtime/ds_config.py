"""Assemble the DeepSpeed config from a template (DeepSpeed-only sections) and the run config
(every number that the run config owns). Nothing has to agree by hand.

The run mode's runtime says which template it uses by default and which ZeRO stages its
engine supports (`Runtime.default_template`, `Runtime.zero_stages`).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from gptscale.config import RunConfig
from gptscale.errors import ConfigError
from gptscale.launch import job_tag
from gptscale.runtime.base import runtime_class

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


def _check_zero_stage(template: dict, name: str, cfg: RunConfig) -> None:
    mode = cfg.parallel.resolved_mode
    runtime = runtime_class(mode)
    stage = template.get("zero_optimization", {}).get("stage", 0)
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by `accelerate launch`
    if launcher_stage not in (None, "", str(stage)):
        raise ConfigError(f"the accelerate config asks for ZeRO stage {launcher_stage} but train.ds_config {name!r} "
                          f"uses stage {stage}; gptscale takes DeepSpeed settings from the run config only, so make "
                          f"the accelerate config's zero_stage {stage} (or choose another train.ds_config)")
    if stage not in runtime.zero_stages:
        raise ConfigError(f"train.ds_config {name!r} uses ZeRO stage {stage}, but parallel.mode={mode}"
                          + runtime.zero_stages_refusal.format(pp=cfg.parallel.pp))


def load_template(cfg: RunConfig) -> dict:
    """The run's DeepSpeed template (train.ds_config, or the mode's default), checked against
    the run config. Cheap: call it before starting distributed work, so that a bad choice
    fails at once on every rank."""
    name = cfg.train.ds_config or runtime_class(cfg.parallel.resolved_mode).default_template
    template = _load_json(template_path(name), "train.ds_config")
    clashes = [k for k in OWNED_BY_RUN_CONFIG if k in template]
    if clashes:
        raise ConfigError(f"train.ds_config {name!r} sets {', '.join(clashes)}, which the run config owns "
                          f"(train.micro_batch, grad_accum, lr, grad_clip, precision); remove them from the template")
    _check_zero_stage(template, name, cfg)
    return template


def assemble(cfg: RunConfig, dp_size: int, on_gpu: bool, template: dict | None = None) -> dict:
    """The complete DeepSpeed config for this run on `dp_size` data-parallel replicas, from its
    template (`load_template(cfg)` unless already loaded)."""
    t = cfg.train
    template = load_template(cfg) if template is None else template
    # A folder per job: two jobs sharing a node would otherwise swap to the same file names.
    ds = _substitute(copy.deepcopy(template), {"nvme_path": os.path.join(t.nvme_path, f"gptscale-{job_tag()}")})
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
