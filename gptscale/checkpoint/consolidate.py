"""A training checkpoint of any run mode -> canonical (TP-merged, unpadded) fp32 weights.

Reads DeepSpeed's files directly, in one process, by the checkpoint's layout (checkpoint/
layout.py; the mode named in COMPLETE.json says which): DeepSpeed's zero_to_fp32 merges the
data-parallel partitions of one ZeRO engine and TP rank (it reads every shard file in a
folder, so each TP rank's files are shown to it in a folder of their own, as symlinks);
pipeline layer files hold whole fp32 weights; the TP shards are then merged with the split table.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gptscale import config, modes
from gptscale.checkpoint.layout import (CONFIG, CheckpointMeta, pipeline_layer_file, stage_dir,
                                        zero_engine_files)
from gptscale.config import RunConfig
from gptscale.convert.tp import merge_tp
from gptscale.ds_import import load_without_code, zero_to_fp32_without_code
from gptscale.errors import CheckpointError
from gptscale.model.gpt import GPT
from gptscale.model.stages import StageLayer, StageModule, layers_with_parameters, stage_bounds, stage_layers
from gptscale.modes import CheckpointFiles
from gptscale.parallel.layers import split_table
from gptscale.parallel.topology import TPGroup

Shard = dict[str, torch.Tensor]  # one TP rank's weights, canonical names, vocabulary still padded


def consolidate(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(the run config, canonical fp32 weights) of the checkpoint folder `path`."""
    path = Path(path)
    layout = CheckpointMeta.read(path).layout  # complete and well-formed
    cfg = config.load(path / CONFIG)
    kind = modes.by_name(layout.mode).checkpoint_files
    with torch.device("meta"):  # shapes and names only
        table = split_table(GPT(cfg.model, TPGroup.shape_only(layout.tp)))
        layers = stage_layers(cfg.model, TPGroup.shape_only(layout.tp))
    if kind is CheckpointFiles.PIPELINE_LAYERS:
        shards = _pipeline_layer_shards(path, layers, layout.tp)
    elif kind is CheckpointFiles.ZERO_ENGINE_PER_STAGE:
        bounds = stage_bounds(cfg.model, layout.pp, cfg.parallel.pipe_partition)
        shards = _zero_engine_per_stage_shards(path, layers, bounds, layout.tp)
    else:
        shards = [{k.removeprefix("module."): v for k, v in _zero_fp32(path, path.name, rank).items()}
                  for rank in range(layout.tp)]
    return cfg, merge_tp(shards, table, cfg.model.vocab_size)


def _zero_fp32(folder: Path, tag: str, tp_rank: int) -> Shard:
    """DeepSpeed's zero_to_fp32 over the files of one TP rank in `folder` (which it knows as `tag`)."""
    files = zero_engine_files(folder, tp_rank)
    if not files:
        raise CheckpointError(f"{folder} holds no DeepSpeed files of TP rank {tp_rank}; the checkpoint is "
                              f"incomplete or was written with another layout")
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / tag
        view.mkdir()
        for file in files:
            (view / file.name).symlink_to(file.resolve())
        with zero_to_fp32_without_code() as zero_to_fp32:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)


def _pipeline_layer_shards(ckpt: Path, layers: list[StageLayer], tp: int) -> list[Shard]:
    """PipelineEngine checkpoints (ZeRO stage <= 1) keep whole weights in per-layer files."""
    shards = []
    for tp_rank in range(tp):
        shard = {}
        for index in layers_with_parameters(layers):
            path = pipeline_layer_file(ckpt, index, tp_rank)
            if not path.is_file():
                raise CheckpointError(f"pipeline checkpoint {ckpt} lacks {path.name}; it is incomplete or "
                                      f"was written by another model")
            state = load_without_code(path, map_location="cpu")
            shard.update({layers[index].prefix + name: tensor.float() for name, tensor in state.items()})
        shards.append(shard)
    return shards


def _zero_engine_per_stage_shards(ckpt: Path, layers: list[StageLayer], bounds: list[int], tp: int) -> list[Shard]:
    """Per TP rank, every stage's ZeRO-3 partitions merged and renamed to canonical names."""
    shards = []
    for tp_rank in range(tp):
        shard = {}
        for stage in range(len(bounds) - 1):
            specs = layers[bounds[stage]:bounds[stage + 1]]
            folder = stage_dir(ckpt, stage)
            state = _zero_fp32(folder, folder.name, tp_rank)
            shard.update({StageModule.canonical_name(specs, k.removeprefix("module.")): v for k, v in state.items()})
        shards.append(shard)
    return shards
