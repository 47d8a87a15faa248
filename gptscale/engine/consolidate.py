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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gptscale.model.gpt import GPT

    path = Path(path)
    cfg = checkpoint_config(path)
    layout = json.loads((path / COMPLETE).read_text())["layout"]
    tp = layout["tp"]
    with torch.device("meta"):
        table = split_table(GPT(cfg.model, TPGroup(group=None, rank=0, size=tp)))
    if layout.get("mode", "zero3") == "pipe":
        # ZeRO stage <= 1 keeps whole fp32 weights in DeepSpeed's per-layer files.
        return cfg, merge_tp(load_pipeline_shards(path, cfg, tp), table, cfg.model.vocab_size)
    shards = []
    for rank in range(tp):
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / path.name
            view.mkdir()
            for file in path.glob(f"*mp_rank_{rank:02d}_*"):
                (view / file.name).symlink_to(file.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name)
        shards.append({k.removeprefix("module."): v for k, v in state.items()})
    return cfg, merge_tp(shards, table, cfg.model.vocab_size)
