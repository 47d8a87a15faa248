"""DeepSpeed templates (`ds_configs/`): finding, reading and checking one against a run config.

Plain JSON and the mode registry, no torch: `gptscale train` checks its template here before
any rank starts, and the estimator and layout search (`gptscale.scaling`) read the ZeRO stage
and offload targets from the same files through the same checks, so they never propose a
template that training would refuse. `runtime/ds_config.py` assembles the full config from it.

The templates are package data (`gptscale._ds_configs`, mapped from the top-level ds_configs/ by
pyproject.toml), read through importlib.resources: a wheel installed anywhere carries them.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from gptscale import modes
from gptscale.config import RunConfig
from gptscale.errors import ConfigError


def packaged_folder(package: str) -> Path:
    """A folder that ships as package data: `gptscale._ds_configs` (the top-level ds_configs/),
    `gptscale._configs` (configs/) or `gptscale._launch` (launch/); pyproject.toml maps each
    repository folder to its name, inside the wheel and for an editable install alike."""
    try:
        folder = resources.files(package)
    except ModuleNotFoundError:
        raise ImportError(f"{package} is missing from this gptscale install: an editable install made before "
                          f"ds_configs/, configs/ and launch/ became package data; reinstall it (make install, "
                          f"or pip install -e .)") from None
    if not isinstance(folder, Path):
        raise ImportError(f"{package} is not a folder on disk ({folder!r}); install gptscale unzipped")
    return folder


TEMPLATE_DIR = packaged_folder("gptscale._ds_configs")
OWNED_BY_RUN_CONFIG = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16", "data_types")


def load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; choose a template in {TEMPLATE_DIR} "
                          f"({', '.join(sorted(p.stem for p in TEMPLATE_DIR.glob('*.json')))}) or give a JSON file")
    try:
        template = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a JSON object")
    return template


def template_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        return path
    return TEMPLATE_DIR / f"{name}.json"


def template_name(cfg: RunConfig) -> str:
    """train.ds_config, or the run mode's default template."""
    return cfg.train.ds_config or modes.resolve(cfg.parallel.mode, cfg.parallel.pp).default_template


def zero_stage(template: dict) -> int:
    section = template.get("zero_optimization", {})
    stage = section.get("stage", 0) if isinstance(section, dict) else None
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} in the DeepSpeed template must be 0, 1, 2 or 3")
    return stage


def _check_zero_stage(template: dict, name: str, cfg: RunConfig) -> None:
    spec = modes.resolve(cfg.parallel.mode, cfg.parallel.pp)
    stage = zero_stage(template)
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by `accelerate launch`
    if launcher_stage not in (None, "", str(stage)):
        raise ConfigError(f"the accelerate config asks for ZeRO stage {launcher_stage} but train.ds_config {name!r} "
                          f"uses stage {stage}; gptscale takes DeepSpeed settings from the run config only, so make "
                          f"the accelerate config's zero_stage {stage} (or choose another train.ds_config)")
    if stage not in spec.zero_stages:
        raise ConfigError(f"train.ds_config {name!r} uses ZeRO stage {stage}, but parallel.mode={spec.name}"
                          + spec.zero_stages_refusal.format(pp=cfg.parallel.pp))


def load_template(cfg: RunConfig) -> dict:
    """The run's DeepSpeed template (train.ds_config, or the mode's default), checked against
    the run config. Cheap: call it before starting distributed work, so that a bad choice
    fails at once on every rank."""
    name = template_name(cfg)
    template = load_json(template_path(name), "train.ds_config")
    clashes = [k for k in OWNED_BY_RUN_CONFIG if k in template]
    if clashes:
        raise ConfigError(f"train.ds_config {name!r} sets {', '.join(clashes)}, which the run config owns "
                          f"(train.micro_batch, grad_accum, lr, grad_clip, precision); remove them from the template")
    _check_zero_stage(template, name, cfg)
    return template
