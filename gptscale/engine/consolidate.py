"""A training checkpoint (ZeRO-3 or pipeline) -> canonical (TP-merged, unpadded) fp32 weights.

DeepSpeed's zero_to_fp32 merges the data-parallel partitions of one model-parallel rank;
it reads every shard file in a folder, so each TP rank's files are shown to it in a folder
of their own (symlinks), and the TP shards are then merged with the split table.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gptscale import config
from gptscale.config import ConfigError, RunConfig
from gptscale.convert.tp import merge_tp
from gptscale.engine.checkpoint import COMPLETE
from gptscale.engine.ds_env import import_deepspeed
from gptscale.engine.pipeline import load_pipeline_shards
from gptscale.parallel.layers import split_table
from gptscale.parallel.topology import TPGroup


def checkpoint_config(path: Path) -> RunConfig:
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"{path} is not a complete gptscale checkpoint (no {COMPLETE}); pass a "
                          f"RUN/checkpoints/stepNNNNNNNN folder")
    return config.load(path / "config.yaml")


def consolidate(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(the run config, canonical fp32 weights) of the checkpoint folder `path`."""
    import_deepspeed()
    from gptscale.model.gpt import GPT

    path = Path(path)
    cfg = checkpoint_config(path)
    layout = json.loads((path / COMPLETE).read_text())["layout"]
    tp = layout["tp"]
    with torch.device("meta"):
        table = split_table(GPT(cfg.model, TPGroup(group=None, rank=0, size=tp)))
    mode = layout.get("mode", "zero3")
    if mode == "pipe":
        # ZeRO stage <= 1 keeps whole fp32 weights in DeepSpeed's per-layer files.
        return cfg, merge_tp(load_pipeline_shards(path, cfg, tp), table, cfg.model.vocab_size)
    if mode == "pipe_zero3":
        return cfg, merge_tp(_pipe_zero3_shards(path, cfg, layout), table, cfg.model.vocab_size)
    shards = [{k.removeprefix("module."): v for k, v in _zero3_fp32(path, path.name, rank).items()}
              for rank in range(tp)]
    return cfg, merge_tp(shards, table, cfg.model.vocab_size)


def _zero3_fp32(folder: Path, tag: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 over the files of one TP rank in `folder` (which it knows as `tag`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / tag
        view.mkdir()
        for file in folder.glob(f"*mp_rank_{tp_rank:02d}_*"):
            (view / file.name).symlink_to(file.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)


def _pipe_zero3_shards(path: Path, cfg: RunConfig, layout: dict) -> list[dict[str, torch.Tensor]]:
    """Per TP rank, every stage's ZeRO-3 partitions merged and renamed to canonical names."""
    from gptscale.engine.pipe_zero3 import StageModule, stage_bounds
    from gptscale.model.pipe import stage_layers

    bounds = stage_bounds(cfg, layout["pp"])
    with torch.device("meta"):
        layers = stage_layers(cfg.model, TPGroup(group=None, rank=0, size=layout["tp"]))
    shards = []
    for tp_rank in range(layout["tp"]):
        shard = {}
        for stage in range(layout["pp"]):
            specs = layers[bounds[stage]:bounds[stage + 1]]
            state = _zero3_fp32(path / f"stage{stage:02d}", f"stage{stage:02d}", tp_rank)
            shard.update({StageModule.canonical_name(specs, k.removeprefix("module.")): v for k, v in state.items()})
        shards.append(shard)
    return shards
