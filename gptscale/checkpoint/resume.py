"""Saving during training and resuming: the commit protocol that makes a checkpoint safe.

Every rank writes its DeepSpeed files (through the runtime, which knows its engine) and its
own `gptscale_rankNNNNN.pt` (RNG states, data-loader position). Only after a barrier that
every rank reaches once its files are on disk does rank 0 write `config.yaml` and, last,
`COMPLETE.json`. Resume looks for COMPLETE.json, never for a bare directory, so a save
interrupted by a killed rank is never picked. `latest` (a text file naming the tag) is
updated after COMPLETE.json, for tools that expect it; then the oldest complete
checkpoints beyond `train.keep_checkpoints` are removed.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from gptscale.atomic import atomic_write, write_text_atomic
from gptscale.checkpoint.layout import COMPLETE, CONFIG, LATEST, CheckpointMeta, Layout, rank_state_file, tag_for
from gptscale.config import RunConfig
from gptscale.errors import CheckpointError


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
        raise CheckpointError(f"--resume {resume}: not a complete gptscale checkpoint (no {COMPLETE}); "
                              f"pass a RUN/checkpoints/stepNNNNNNNN folder or --resume auto")
    return path


class RunCheckpoints:
    """The checkpoints of one run: `RUN/checkpoints/stepNNNNNNNN`, for this run's config and layout."""

    def __init__(self, run_dir: Path, cfg: RunConfig, layout: Layout):
        self.run_dir, self.cfg, self.layout = run_dir, cfg, layout
        self.folder = run_dir / "checkpoints"

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.folder)

    def save(self, step: int, rank_state: dict, write_files: Callable[[Path], None]) -> Path:
        """Every rank: `write_files(folder)` (its DeepSpeed files and whatever else it keeps) and
        `rank_state`; then rank 0 commits (see above)."""
        path = self.folder / tag_for(step)
        write_files(path)
        with atomic_write(rank_state_file(path, dist.get_rank())) as f:
            torch.save(rank_state, f)
        _fault_injection(step)
        dist.barrier()  # every rank's files are on disk
        if dist.get_rank() == 0:
            meta = CheckpointMeta(step=step, layout=self.layout, model=dataclasses.asdict(self.cfg.model))
            write_text_atomic(path / CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            write_text_atomic(path / COMPLETE, meta.to_json())
            write_text_atomic(self.folder / LATEST, path.name)
            for old in self.complete()[:-self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def load(self, path: Path, read_files: Callable[[Path], None]) -> dict | None:
        """Check that `path` fits this run, then `read_files(path)` (restore the engine); returns
        this rank's saved state (RNG, data position) or None."""
        meta = CheckpointMeta.read(path)
        current = dataclasses.asdict(self.cfg.model)
        differs = {k: (v, current.get(k)) for k, v in meta.model.items() if current.get(k) != v}
        if differs:
            what = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(differs.items()))
            raise CheckpointError(f"checkpoint {path} is for another model shape ({what}); resume with its config "
                                  f"({path / CONFIG}) or start a new run directory")
        if meta.layout != self.layout:
            raise CheckpointError(f"checkpoint {path} was written with layout {meta.layout.to_json()} but this run "
                                  f"has {self.layout.to_json()}; DeepSpeed ZeRO-3 checkpoints resume on the same "
                                  f"tp/pp/dp layout")
        read_files(path)
        rank_file = rank_state_file(path, dist.get_rank())
        return torch.load(rank_file, weights_only=False) if rank_file.is_file() else None


def _fault_injection(step: int) -> None:
    """GPTSCALE_FAULT=die_in_save:STEP:RANK kills RANK in the middle of saving STEP, as a
    preempted or crashed node would; the test suite uses it to prove such a save is never resumed."""
    fault = os.environ.get("GPTSCALE_FAULT", "")
    if fault.startswith("die_in_save:"):
        _, at_step, at_rank = fault.split(":")
        if int(at_step) == step and int(at_rank) == dist.get_rank():
            os._exit(9)
