"""The registry of run modes: the one file that names every mode.

A run mode is how the model is split over the ranks and which DeepSpeed engine trains it.
This table is plain data and imports no torch, so that the layers below the runtime can
ask it: the config (is `parallel.mode` known, may it use pipeline stages), the checkpoint
reader (how a mode's checkpoint folder is organised) and the DeepSpeed config assembly. A
mode's behaviour lives in one module of `gptscale/runtime/`, named here by its import path
and imported only when a run uses it (`runtime.base.runtime_class`).

Adding a mode: write one module implementing `gptscale.runtime.base.Runtime` and add one
`register(ModeSpec(...))` line below. Nothing else names modes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from gptscale.errors import ConfigError

AUTO = "auto"


class CheckpointFiles(str, enum.Enum):
    """How a mode's DeepSpeed files are organised inside a checkpoint folder (checkpoint/layout.py
    reads each kind)."""

    ONE_ZERO_ENGINE = "one_zero_engine"  # one DeepSpeedEngine's model and ZeRO files in the folder itself
    PIPELINE_LAYERS = "pipeline_layers"  # PipelineEngine: one weights file per layer and TP rank
    ZERO_ENGINE_PER_STAGE = "zero_engine_per_stage"  # stageNN/ per pipeline stage, each one ZeRO engine's files


@dataclass(frozen=True)
class ModeSpec:
    name: str
    summary: str  # one line, for --help and start-up messages
    runtime: str  # "module:Class" implementing gptscale.runtime.base.Runtime
    checkpoint_files: CheckpointFiles
    pipeline: bool  # cuts the model into parallel.pp stages; False: parallel.pp must be 1
    default_template: str  # ds_configs/<name>.json when train.ds_config is unset
    zero_stages: tuple[int, ...]  # ZeRO stages this mode's engine runs
    zero_stages_refusal: str  # the rest of the error for another stage ("{pp}": parallel.pp)
    interleaves: bool = False  # runs parallel.virtual_stages > 1 (interleaved 1F1B)
    # model.compile: DeepSpeed's hooks sit around whole blocks (ZeRO-3 leaf modules, or no ZeRO-3
    # hooks at all), so each block's computation compiles as one graph (gptscale/model/compile.py).
    compiles_blocks: bool = True


_MODES: dict[str, ModeSpec] = {}


def register(spec: ModeSpec) -> ModeSpec:
    """Add a mode (the modes below; tests register test doubles the same way)."""
    if spec.name == AUTO or spec.name in _MODES:
        raise ValueError(f"run mode {spec.name!r} is already defined")
    _MODES[spec.name] = spec
    return spec


_ZERO3_REFUSAL = " partitions parameters with ZeRO stage 3; use a stage 3 template (train.ds_config=zero3)"

register(ModeSpec(
    "zero3", "TP x DP, parameters, gradients and optimizer states ZeRO-3-sharded over DP",
    runtime="gptscale.runtime.zero3:Zero3Runtime", checkpoint_files=CheckpointFiles.ONE_ZERO_ENGINE,
    pipeline=False, default_template="zero3", zero_stages=(3,), zero_stages_refusal=_ZERO3_REFUSAL))
register(ModeSpec(
    "pipe", "TP x PP x DP on DeepSpeed's PipelineEngine (1F1B), ZeRO stage 0/1 over DP",
    runtime="gptscale.runtime.pipe:PipeRuntime", checkpoint_files=CheckpointFiles.PIPELINE_LAYERS, pipeline=True,
    default_template="pipe_zero1", zero_stages=(0, 1),
    zero_stages_refusal=(" (parallel.pp={pp}) runs DeepSpeed's PipelineEngine, which supports only ZeRO stage 0 or 1 "
                         "(it shards no gradients or parameters across pipeline micro-batches); use "
                         "train.ds_config=pipe_zero1, or parallel.pp=1 for ZeRO-3")))
register(ModeSpec(
    "pipe_zero3", "TP x PP x DP, each pipeline stage ZeRO-3-sharded over its DP group (gptscale's 1F1B)",
    runtime="gptscale.runtime.pipe_zero3.runtime:PipeZero3Runtime",
    checkpoint_files=CheckpointFiles.ZERO_ENGINE_PER_STAGE, pipeline=True, interleaves=True,
    default_template="zero3", zero_stages=(3,), zero_stages_refusal=_ZERO3_REFUSAL,
    compiles_blocks=False))  # its PipeBlocks are not the template's leaf class: DeepSpeed hooks every layer

# What `parallel.mode: auto` becomes: no pipeline stages -> the first, else the second.
_AUTO_CHOICE = ("zero3", "pipe")


def names() -> tuple[str, ...]:
    """Every value `parallel.mode` accepts, `auto` first."""
    return (AUTO, *_MODES)


def resolve(mode: str, pp: int) -> ModeSpec:
    """The mode a run uses: `mode` itself, or for `auto` the choice for `pp` stages."""
    if mode == AUTO:
        mode = _AUTO_CHOICE[0] if pp == 1 else _AUTO_CHOICE[1]
    if mode not in _MODES:
        raise ConfigError(f"parallel.mode={mode!r} is unknown; choose one of {', '.join(names())}")
    return _MODES[mode]


def by_name(name: str) -> ModeSpec:
    """The mode a checkpoint names (no `auto` there)."""
    if name not in _MODES:
        raise ConfigError(f"run mode {name!r} is unknown to this gptscale; known: {', '.join(_MODES)}")
    return _MODES[name]


def check(mode: str, pp: int) -> None:
    """Errors for a mode that cannot run `pp` stages."""
    spec = resolve(mode, pp)
    pipeline_mode = resolve(AUTO, 2).name
    if pp > 1 and not spec.pipeline:
        raise ConfigError(f"parallel.mode={spec.name} cannot use parallel.pp={pp}; set parallel.mode="
                          f"{pipeline_mode} (or auto) for pipeline stages, or parallel.pp=1")
