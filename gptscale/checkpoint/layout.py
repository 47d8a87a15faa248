"""The on-disk layout of a gptscale checkpoint, for every run mode.

    RUN/checkpoints/
      latest                      the newest complete tag, for tools that expect it
      step00000300/               one checkpoint (its "tag"), renamed into place only when complete
        COMPLETE.json             step, run id, commit number, rank layout, model shape, tokenizer hash
        config.yaml               the resolved run config
        tokenizer/                the training data's tokenizer (generate needs no other)
        gptscale_rank00000.safetensors   per rank: RNG states and data-loader position (no pickle)
        ...                       DeepSpeed's own files, organised by the mode's CheckpointFiles:

    ONE_ZERO_ENGINE        mp_rank_TT_model_states.pt, zero_pp_rank_D_mp_rank_TT_optim_states.pt, ...
                           (one DeepSpeedEngine; TT = TP rank, D = DP rank)
    PIPELINE_LAYERS        layer_LL-model_TT-model_states.pt per stage layer LL with parameters and
                           TP rank TT (whole fp32 weights), plus the engine's mp_rank / optimizer files
    ZERO_ENGINE_PER_STAGE  stageSS/ per pipeline stage SS, each holding one ZeRO engine's files as in
                           ONE_ZERO_ENGINE, its parameters named `layers.<i>.<name>` (model.stages)

A save is written into `.stepNNNNNNNN.partial-RUNID/` and renamed to `stepNNNNNNNN/` after
COMPLETE.json, so a folder under a step's name is always whole. A mode declares its kind in
`gptscale.modes`; this module says where the files of each kind are, and nothing here
imports the training runtime.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptscale.errors import CheckpointError
from gptscale.modes import CheckpointFiles

COMPLETE = "COMPLETE.json"
LATEST = "latest"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
STEP_FOLDER = re.compile(r"step(\d{8,})")  # a complete checkpoint's folder name
# A staged save whose COMPLETE.json was written but whose rename a crash prevented is complete too.
STAGED_FOLDER = re.compile(r"\.step(\d{8,})\.partial-[0-9a-f]+")


@dataclass(frozen=True)
class Layout:
    """The rank layout a checkpoint was written with."""

    mode: str
    tp: int
    pp: int
    dp: int
    # Model chunks per stage (interleaved 1F1B): they order a stage's files' parameters.
    # Written only when above 1, so checkpoints of other runs read as before.
    virtual_stages: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.virtual_stages == 1:
            del data["virtual_stages"]
        return data

    @classmethod
    def from_json(cls, data: Any, where: Path) -> "Layout":
        fields = {"mode": str, "tp": int, "pp": int, "dp": int}
        optional = {"virtual_stages": int}
        if not isinstance(data, dict) or not set(fields) <= set(data) <= set(fields) | set(optional) or any(
                type(data[k]) is not kind for k, kind in {**fields, **optional}.items() if k in data):
            raise CheckpointError(f"{where}: 'layout' must hold exactly {', '.join(fields)} (a string and three "
                                  f"integers; virtual_stages too if above 1), found {data!r}; the file is damaged "
                                  f"or not gptscale's")
        if min(data["tp"], data["pp"], data["dp"], data.get("virtual_stages", 1)) < 1:
            raise CheckpointError(f"{where}: layout {data} has a degree below 1")
        return cls(**data)


@dataclass(frozen=True)
class CheckpointMeta:
    """What COMPLETE.json records: the step, the layout, the model (ModelConfig fields), which
    run wrote it and when among that folder's saves (`commit`: 1, 2, ...; the newest commit is
    what auto-resume takes, whatever its step), and the tokenizer's hash (None: synthetic data)."""

    step: int
    layout: Layout
    model: dict[str, Any]
    run_id: str = ""  # empty in checkpoints written before run ids
    commit: int = 0
    tokenizer_sha256: str | None = None

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "layout": self.layout.to_json(), "model": self.model,
                           "run_id": self.run_id, "commit": self.commit, "tokenizer_sha256": self.tokenizer_sha256},
                          indent=2)

    @classmethod
    def read(cls, ckpt: Path) -> "CheckpointMeta":
        path = ckpt / COMPLETE
        if not path.is_file():
            raise CheckpointError(f"{ckpt} is not a complete gptscale checkpoint (no {COMPLETE}); pass a "
                                  f"RUN/checkpoints/stepNNNNNNNN folder")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({type(exc).__name__}: {exc}); the checkpoint is "
                                  f"damaged") from None
        if not isinstance(data, dict) or type(data.get("step")) is not int or not isinstance(data.get("model"), dict):
            raise CheckpointError(f"{path} lacks an integer 'step' or a 'model' mapping; the checkpoint is damaged")
        run_id, commit, tokenizer = data.get("run_id", ""), data.get("commit", 0), data.get("tokenizer_sha256")
        if not isinstance(run_id, str) or type(commit) is not int or not isinstance(tokenizer, (str, type(None))):
            raise CheckpointError(f"{path}: 'run_id', 'commit' or 'tokenizer_sha256' has the wrong type; the "
                                  f"checkpoint is damaged")
        return cls(step=data["step"], layout=Layout.from_json(data.get("layout"), path), model=data["model"],
                   run_id=run_id, commit=commit, tokenizer_sha256=tokenizer)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def staging_dir(folder: Path, step: int, run_id: str) -> Path:
    """Where a save of `step` is written before it is complete (ignored by every reader)."""
    return folder / f".{tag_for(step)}.partial-{run_id[:12]}"


def rank_state_file(ckpt: Path, rank: int) -> Path:
    """gptscale's own per-rank state (RNG, data position), as safetensors."""
    return ckpt / f"gptscale_rank{rank:05d}.safetensors"


def legacy_rank_state_file(ckpt: Path, rank: int) -> Path:
    """The same, as checkpoints before the safetensors format stored it (a pickle)."""
    return ckpt / f"gptscale_rank{rank:05d}.pt"


def stage_dir(ckpt: Path, stage: int) -> Path:
    return ckpt / f"stage{stage:02d}"


def engine_location(kind: CheckpointFiles, ckpt: Path, stage: int) -> tuple[Path, str]:
    """(folder, tag) to hand DeepSpeed's save_checkpoint / load_checkpoint for the engine of
    pipeline stage `stage` (0 unless the kind has an engine per stage): DeepSpeed writes to folder/tag."""
    if kind is CheckpointFiles.ZERO_ENGINE_PER_STAGE:
        return ckpt, stage_dir(ckpt, stage).name
    return ckpt.parent, ckpt.name


def zero_engine_files(folder: Path, tp_rank: int) -> list[Path]:
    """One ZeRO engine's files for TP rank `tp_rank` (model states and every DP rank's partitions)."""
    return sorted(folder.glob(f"*mp_rank_{tp_rank:02d}_*"))


def pipeline_layer_file(ckpt: Path, layer_index: int, tp_rank: int) -> Path:
    """DeepSpeed's PipelineEngine name for one stage layer's weights of one TP rank."""
    return ckpt / f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"
