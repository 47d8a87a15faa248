"""Saving during training and resuming: the commit protocol that makes a checkpoint safe.

A save of step N is written into a staging folder `.stepN.partial-RUNID/`: every rank writes
its DeepSpeed files (through the runtime) and its rank state (RNG, data position; no
pickle), then fsyncs every file and folder it can see. After a barrier, rank 0 checks that
every rank's state is there, adds config.yaml, the tokenizer and, last, COMPLETE.json, and
renames the folder to `stepN/` (a folder of that name from before is moved aside first, so
a crash leaves either the old checkpoint or the new one, never a mix). Then `latest`, and
the rotation: the oldest commits beyond train.keep_checkpoints go, never the one just
written, COMPLETE.json first.

Resume takes the newest *commit* (COMPLETE.json's counter), not the highest step: a run
resumed from an older checkpoint continues that branch. A fresh start refuses a run folder
that already holds checkpoints (they would be rotated away, or resumed by mistake) unless
told to clear it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import yaml

from gptscale import faults
from gptscale.atomic import fsync_dir, fsync_tree, write_text_atomic
from gptscale.checkpoint.layout import (COMPLETE, CONFIG, LATEST, STEP_FOLDER, TOKENIZER, CheckpointMeta, Layout,
                                        rank_state_file, staging_dir, tag_for)
from gptscale.checkpoint.rank_state import load_rank_state, save_rank_state
from gptscale.config import RunConfig
from gptscale.errors import CheckpointError


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest commit first (COMPLETE.json's counter, then step)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        if path.is_dir() and STEP_FOLDER.fullmatch(path.name) and (path / COMPLETE).is_file():
            meta = CheckpointMeta.read(path)
            found.append(((meta.commit, meta.step), path))
    return [path for _, path in sorted(found)]


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


def refuse_used_run_folder(run_dir: Path) -> None:
    """A fresh start (--resume none) must not share a folder with another run's checkpoints."""
    found = complete_checkpoints(run_dir / "checkpoints")
    if found:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest {found[-1].name}); a fresh run there would "
                              f"rotate them away or be confused with them: resume them (--resume auto), choose "
                              f"another train.out_dir, or pass --overwrite-run to delete them")


def remove_checkpoint(path: Path) -> None:
    """COMPLETE.json first (durably), so a removal cut short never leaves a 'complete' remnant."""
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def clear_run_folder(run_dir: Path) -> None:
    """--overwrite-run: every checkpoint and staging folder of `run_dir` removed."""
    folder = run_dir / "checkpoints"
    for path in complete_checkpoints(folder):
        remove_checkpoint(path)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".step"):
                shutil.rmtree(path, ignore_errors=True)
        (folder / LATEST).unlink(missing_ok=True)


@dataclass
class Resumed:
    step: int
    run_id: str
    data: dict[str, Any]  # the rank's loader state
    rng: dict[str, Any]  # the rank's RNG states
    changes: list[str]  # run-config fields that differ from the checkpoint's, "train.lr: 0.001 -> 0.002"


class RunCheckpoints:
    """The checkpoints of one run: `RUN/checkpoints/stepNNNNNNNN`, for this run's config and layout."""

    def __init__(self, run_dir: Path, cfg: RunConfig, layout: Layout, run_id: str,
                 tokenizer_file: str | None = None, tokenizer_sha256: str | None = None):
        self.run_dir, self.cfg, self.layout, self.run_id = run_dir, cfg, layout, run_id
        self.tokenizer_file, self.tokenizer_sha256 = tokenizer_file, tokenizer_sha256
        self.folder = run_dir / "checkpoints"

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.folder)

    def save(self, step: int, data: dict, rng: dict, write_files: Callable[[Path], None]) -> Path:
        """Every rank: `write_files(folder)` (its DeepSpeed files and whatever else it keeps) and its
        rank state; then rank 0 commits (see above). Returns the checkpoint's path."""
        rank, staging = dist.get_rank(), staging_dir(self.folder, step, self.run_id)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt at the same step
            staging.mkdir(parents=True)
        dist.barrier()
        write_files(staging)
        save_rank_state(rank_state_file(staging, rank), data, rng)
        faults.in_save(step, rank)
        fsync_tree(staging)  # every rank: whatever it wrote is on disk before rank 0 commits
        dist.barrier()
        failure = [self._commit_or_say_why(staging, step) if rank == 0 else None]
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise CheckpointError(failure[0])
        return self.folder / tag_for(step)

    def _commit_or_say_why(self, staging: Path, step: int) -> str | None:
        try:
            return self._commit(staging, step)
        except Exception as exc:  # noqa: BLE001 - every rank must learn it, or they wait forever
            return f"committing checkpoint {staging} failed: {type(exc).__name__}: {exc}"

    def _commit(self, staging: Path, step: int) -> str | None:
        """Rank 0: finish and rename the staged checkpoint; returns an error message or None."""
        missing = [r for r in range(dist.get_world_size()) if not rank_state_file(staging, r).is_file()]
        if missing:
            return (f"checkpoint {staging} lacks the state of rank(s) {missing} after every rank wrote it: is "
                    f"train.out_dir on a file system that every node shares?")
        existing = self.complete()
        commit = 1 + max((CheckpointMeta.read(p).commit for p in existing), default=0)
        meta = CheckpointMeta(step=step, layout=self.layout, model=dataclasses.asdict(self.cfg.model),
                              run_id=self.run_id, commit=commit, tokenizer_sha256=self.tokenizer_sha256)
        write_text_atomic(staging / CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if self.tokenizer_file is not None:
            shutil.copytree(Path(self.tokenizer_file).parent, staging / TOKENIZER,
                            ignore=lambda d, names: [n for n in names if not n.endswith(".json")])
            fsync_tree(staging / TOKENIZER)
        write_text_atomic(staging / COMPLETE, meta.to_json())
        fsync_dir(staging)
        final = self.folder / tag_for(step)
        if final.exists():  # an older checkpoint of this step: replaced whole, never mixed
            aside = staging.with_name(staging.name + ".replaced")
            os.replace(final, aside)
            os.replace(staging, final)
            fsync_dir(self.folder)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
            fsync_dir(self.folder)
        write_text_atomic(self.folder / LATEST, final.name)
        for old in self.complete()[:-self.cfg.train.keep_checkpoints]:
            if old != final:
                remove_checkpoint(old)
        for stale in self.folder.glob(".step*.partial-*"):  # saves cut short earlier
            shutil.rmtree(stale, ignore_errors=True)
        return None

    def load(self, path: Path, read_files: Callable[[Path], None]) -> Resumed:
        """Check that `path` fits this run, `read_files(path)` (restore the engine), and return
        this rank's state and what changed in the run config."""
        meta = CheckpointMeta.read(path)
        current = dataclasses.asdict(self.cfg.model)
        shape = [k for k in current if k not in self.cfg.model.training_only_fields()]
        differs = {k: (meta.model.get(k), current[k]) for k in shape if meta.model.get(k) != current[k]}
        if differs:
            what = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(differs.items()))
            raise CheckpointError(f"checkpoint {path} is for another model shape ({what}); resume with its config "
                                  f"({path / CONFIG}) or start a new run directory")
        if meta.layout != self.layout:
            raise CheckpointError(f"checkpoint {path} was written with layout {meta.layout.to_json()} but this run "
                                  f"has {self.layout.to_json()}; DeepSpeed ZeRO-3 checkpoints resume on the same "
                                  f"tp/pp/dp layout")
        rank_file = rank_state_file(path, dist.get_rank())
        if not rank_file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {rank_file.name} (this rank's RNG and data position); "
                                  f"it is incomplete or was written by an earlier gptscale: resume from another")
        read_files(path)
        data, rng = load_rank_state(rank_file)
        return Resumed(step=meta.step, run_id=meta.run_id, data=data, rng=rng, changes=self._changes(path))

    def _changes(self, path: Path) -> list[str]:
        from gptscale import config

        try:
            saved = config.load(path / CONFIG).to_dict()
        except Exception:  # noqa: BLE001 - only a report: an unreadable old config changes nothing
            return []
        now = self.cfg.to_dict()
        return [f"{section}.{key}: {saved[section][key]!r} -> {value!r}" for section in ("model", "data", "train")
                for key, value in now[section].items() if saved[section].get(key) != value]

