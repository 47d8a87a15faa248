"""Checkpoints: DeepSpeed's native files plus what makes them safe to resume from.

A checkpoint is `RUN/checkpoints/stepNNNNNNNN/`: DeepSpeed's model/optimizer shards, one
`gptscale_rankNNNNN.pt` per rank (RNG states, data-loader state), the resolved run config,
and, written by rank 0 only after a barrier that every rank reaches once its files are
on disk, `COMPLETE.json`. Resume looks for COMPLETE.json, never for a bare directory, so
a save interrupted by a killed rank is never picked. `latest` (a text file naming the tag)
is updated after COMPLETE.json, for tools that expect it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from gptscale.atomic import atomic_write, write_text_atomic
from gptscale.config import ConfigError, RunConfig

COMPLETE = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`none`: start fresh; `auto`: the newest complete checkpoint of the run, if any; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete gptscale checkpoint (no {COMPLETE}); "
                          f"pass a RUN/checkpoints/stepNNNNNNNN folder or --resume auto")
    return path


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"gptscale_rank{rank:05d}.pt"


def save(engine, run_dir: Path, step: int, cfg: RunConfig, layout: dict, rank_state: dict, keep: int,
         subdir: str | None = None) -> Path:
    """Save; `subdir` puts this rank's DeepSpeed files in path/subdir (one per pipe_zero3 stage,
    whose engines would otherwise write the same file names)."""
    ckpt_dir = run_dir / "checkpoints"
    tag = tag_for(step)
    path = ckpt_dir / tag
    if subdir is None:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    else:
        engine.save_checkpoint(str(path), tag=subdir, client_state={"step": step}, save_latest=False)
    with atomic_write(_rank_file(path, dist.get_rank())) as f:
        torch.save(rank_state, f)
    _fault_injection(step)
    dist.barrier()  # every rank's files are on disk
    if dist.get_rank() == 0:
        write_text_atomic(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text_atomic(path / COMPLETE, json.dumps({"step": step, "layout": layout,
                                                       "model": dataclasses.asdict(cfg.model)}, indent=2))
        write_text_atomic(ckpt_dir / "latest", tag)
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _fault_injection(step: int) -> None:
    """GPTSCALE_FAULT=die_in_save:STEP:RANK kills RANK in the middle of saving STEP, as a
    preempted or crashed node would; the test suite uses it to prove such a save is never resumed."""
    import os

    fault = os.environ.get("GPTSCALE_FAULT", "")
    if fault.startswith("die_in_save:"):
        _, at_step, at_rank = fault.split(":")
        if int(at_step) == step and int(at_rank) == dist.get_rank():
            os._exit(9)


def load(engine, path: Path, cfg: RunConfig, layout: dict, subdir: str | None = None) -> dict | None:
    """Restore engine state from `path`; returns this rank's saved state (RNG, loader) or None."""
    meta = json.loads((path / COMPLETE).read_text())
    current = dataclasses.asdict(cfg.model)
    differs = {k: (v, current.get(k)) for k, v in meta["model"].items() if current.get(k) != v}
    if differs:
        what = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(differs.items()))
        raise ConfigError(f"checkpoint {path} is for another model shape ({what}); resume with its config "
                          f"({path / 'config.yaml'}) or start a new run directory")
    if meta["layout"] != layout:
        raise ConfigError(f"checkpoint {path} was written with layout {meta['layout']} but this run has {layout}; "
                          f"DeepSpeed ZeRO-3 checkpoints resume on the same tp/pp/dp layout")
    where, tag = (path.parent, path.name) if subdir is None else (path, subdir)
    engine.load_checkpoint(str(where), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    rank_file = _rank_file(path, dist.get_rank())
    return torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
