"""Saving during training and resuming: the commit protocol that makes a checkpoint safe.

A save of step N is written into a staging folder `.stepN.partial-RUNID/`: every rank writes
its DeepSpeed files (through the runtime) and its rank state (RNG, data position; no
pickle), then flushes the file system it wrote to (syncfs: one call per rank, however many
files). Every rank then learns whether any rank failed (no rank waits forever on one that
raised). Rank 0 checks that every rank's state is there, adds config.yaml, the tokenizer
and, last, COMPLETE.json, fsyncs the folders and renames the staging folder to `stepN/`; an
older `stepN/` is moved aside first. A staged folder with COMPLETE.json counts as complete
too, so a crash between the renames leaves the new checkpoint readable. Then `latest`, and
the rotation: the oldest commits beyond train.keep_checkpoints go, never the one just
written, COMPLETE.json first.

Resume takes the newest *commit* (COMPLETE.json's counter), not the highest step: a run
resumed from an older checkpoint continues that branch. Before DeepSpeed reads anything,
every rank checks its own state and a share of DeepSpeed's files (no code in them), and all
ranks agree. A fresh start refuses a run folder that already holds checkpoints (they would
be rotated away, or resumed by mistake) unless told to clear it.
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
from gptscale.atomic import fsync_dir, sync_filesystem, write_text_atomic
from gptscale.checkpoint.layout import (COMPLETE, CONFIG, LATEST, STAGED_FOLDER, STEP_FOLDER, TOKENIZER,
                                        CheckpointMeta, Layout, legacy_rank_state_file, rank_state_file,
                                        staging_dir, tag_for)
from gptscale.checkpoint.rank_state import load_legacy_rank_state, load_rank_state, save_rank_state
from gptscale.config import RunConfig
from gptscale.ds_import import scan_without_code
from gptscale.errors import CheckpointError, UserError

RUN_FILES = ("metrics.jsonl", "tensorboard", "loss.png", "config.yaml", "ds_config.json")  # a run's own outputs


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest commit first (COMPLETE.json's counter, then step)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        named = STEP_FOLDER.fullmatch(path.name) or STAGED_FOLDER.fullmatch(path.name)
        if named and path.is_dir() and (path / COMPLETE).is_file():
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
    folder = run_dir / "checkpoints"
    used = sorted(p.name for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name)) if folder.is_dir() else []
    if used:
        raise CheckpointError(f"{run_dir} already holds checkpoints (e.g. {used[-1]}); a fresh run there would "
                              f"rotate them away or be confused with them: resume them (--resume auto), choose "
                              f"another train.out_dir, or pass --overwrite-run to delete them")


def remove_checkpoint(path: Path) -> None:
    """COMPLETE.json first (durably), so a removal cut short never leaves a 'complete' remnant."""
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def clear_run_folder(run_dir: Path) -> None:
    """--overwrite-run: every checkpoint (complete, staged or damaged) and the run's own outputs removed."""
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and (STEP_FOLDER.fullmatch(path.name) or path.name.startswith(".step")):
                remove_checkpoint(path)
        (folder / LATEST).unlink(missing_ok=True)
    for name in RUN_FILES:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def agree(error: str | None, what: str) -> None:
    """Collective: every rank learns whether any rank failed `what`; then all raise the first failure."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"{what}, rank {rank}: {message}")


def attempt(step: Callable[[], Any]) -> str | None:
    """Run `step`; its failure as one line (for `agree`), or None."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, not swallowed
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"
    return None


def check_shared_folder(folder: Path, seconds: float = 10.0) -> None:
    """Collective: every rank must see the file rank 0 just wrote in `folder`, or the run would
    save each node's part of a checkpoint where the others cannot read it (a relative or
    node-local train.out_dir). NFS may take a few seconds to show a new name elsewhere."""
    import socket
    import time
    import uuid

    name = [f".gptscale-shared-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None]
    agree(attempt(lambda: (folder.mkdir(parents=True, exist_ok=True), (folder / name[0]).write_text("")))
          if dist.get_rank() == 0 else None, f"writing to train.out_dir {folder}")
    dist.broadcast_object_list(name, src=0)
    probe = folder / name[0]
    deadline = time.monotonic() + seconds
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
        if folder.is_dir():
            os.listdir(folder)  # refreshes an NFS client's cached view of the folder
    seen = None if probe.exists() else (
        f"on host {socket.gethostname()} it cannot see {probe}, which rank 0 wrote: train.out_dir must be one folder "
        f"that every node shares (an absolute path on NFS, Lustre, GPFS), not a node-local or relative path")
    try:
        agree(seen, f"train.out_dir {folder} is not shared between the nodes")  # every rank has looked
    finally:
        if dist.get_rank() == 0:
            probe.unlink(missing_ok=True)


def _with_free_space(error: str | None, folder: Path) -> str | None:
    """A failed write says how full the file system is (torch reports ENOSPC as a zip-writer
    position error); a quota can fail a write with room to spare, so only the number is given."""
    if error is None:
        return None
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return error
    return f"{error} ({free / 2**20:.1f} MiB free on that file system: full, or over a quota?)"


@dataclass
class Resumed:
    step: int
    run_id: str
    data: dict[str, Any]  # the rank's loader state
    rng: dict[str, Any] | None  # the rank's RNG states (None: resumed at another layout, start afresh)
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

    def save(self, step: int, data: dict, rng: dict, write_files: Callable[[Path], None], rotate: bool = True) -> Path:
        """Every rank: `write_files(folder)` (its DeepSpeed files and whatever else it keeps) and its
        rank state; then rank 0 commits (see above) and, if `rotate`, removes old checkpoints (not
        when stopping on a signal: every second counts then, and the next save rotates them).
        Returns the checkpoint's path."""
        rank, staging = dist.get_rank(), staging_dir(self.folder, step, self.run_id)

        def prepare() -> None:
            shutil.rmtree(staging, ignore_errors=True)  # a save of this step cut short earlier
            staging.mkdir(parents=True)

        def write() -> None:
            write_files(staging)
            save_rank_state(rank_state_file(staging, rank), data, rng)
            faults.in_save(step, rank)
            sync_filesystem(staging)  # on disk before rank 0 commits

        agree(attempt(prepare) if rank == 0 else None, f"preparing checkpoint {staging}")
        agree(_with_free_space(attempt(write), staging), f"writing checkpoint {staging}")
        failure = [attempt(lambda: self._commit(staging, step, rotate)) if rank == 0 else None]
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise CheckpointError(f"committing checkpoint {staging}: {failure[0]}")
        return self.folder / tag_for(step)

    def _commit(self, staging: Path, step: int, rotate: bool = True) -> None:
        """Rank 0: finish, make durable and rename the staged checkpoint, then rotate."""
        missing = [r for r in range(dist.get_world_size()) if not rank_state_file(staging, r).is_file()]
        if missing:
            raise CheckpointError(f"it lacks the state of rank(s) {missing} after every rank wrote it: is "
                                  f"train.out_dir on a file system that every node shares?")
        commit = 1 + max((CheckpointMeta.read(p).commit for p in self.complete()), default=0)
        meta = CheckpointMeta(step=step, layout=self.layout, model=dataclasses.asdict(self.cfg.model),
                              run_id=self.run_id, commit=commit, tokenizer_sha256=self.tokenizer_sha256)
        write_text_atomic(staging / CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if self.tokenizer_file is not None:
            shutil.copytree(Path(self.tokenizer_file).parent, staging / TOKENIZER,
                            ignore=lambda d, names: [n for n in names if not n.endswith(".json")])
        for folder, _, _ in os.walk(staging):  # the files are synced; their names now
            fsync_dir(folder)
        sync_filesystem(staging)
        write_text_atomic(staging / COMPLETE, meta.to_json())  # from here the staged folder is complete
        final = self.folder / tag_for(step)
        if final.exists():  # an older checkpoint of this step (another branch): replaced whole, never mixed
            aside = staging.with_name(staging.name + ".replaced")
            os.replace(final, aside)
            os.replace(staging, final)
            fsync_dir(self.folder)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
            fsync_dir(self.folder)
        write_text_atomic(self.folder / LATEST, final.name)
        if not rotate:
            return
        for old in self.complete()[:-self.cfg.train.keep_checkpoints]:
            if old != final:
                remove_checkpoint(old)
        for stale in self.folder.glob(".step*.partial-*"):  # saves cut short (a complete one is a checkpoint)
            if not (stale / COMPLETE).is_file() or stale.name.endswith(".replaced"):
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, read_files: Callable[[Path], None]) -> Resumed:
        """Check that `path` fits this run and is safe to read (every rank, agreed), then
        `read_files(path)` (restore the engine); returns this rank's state and what changed."""
        rank, world = dist.get_rank(), dist.get_world_size()
        found: dict[str, Any] = {}

        def check() -> None:
            found["meta"] = self._check_fits(path)
            found["state"] = self._rank_state(path, rank)
            shares = sorted(p for p in path.rglob("*.pt") if not p.name.startswith("gptscale_rank"))[rank::world]
            scan_without_code(shares)

        agree(attempt(check), f"checking checkpoint {path}")
        read_files(path)
        meta, (data, rng) = found["meta"], found["state"]
        return Resumed(step=meta.step, run_id=meta.run_id, data=data, rng=rng, changes=self._changes(path))

    def load_resharded(self, path: Path, redeal: Callable[[list[dict], int], dict],
                       read_state: Callable[[Any, int, int], None]) -> Resumed:
        """Continue from a checkpoint of another layout (mode, TP, PP, DP), or a canonical folder
        with optimizer state: checked on every rank and agreed, then `read_state(source, step,
        adam_step)` puts Adam's state into the engine (the weights came in through init_from),
        and `redeal(loader states, one per old DP rank, step)` gives this rank's data position.
        The RNG starts afresh (rng None): there is no old rank to take it from."""
        from gptscale.checkpoint.convert import open_source
        from gptscale.parallel.topology import RankLayout

        found: dict[str, Any] = {}

        def check() -> None:
            source = open_source(path)
            self._check_model(path, dataclasses.asdict(source.cfg.model))
            found["source"], found["state"] = source, source.trainer_state()

        agree(attempt(check), f"checking {path}")
        source, state = found["source"], found["state"]
        saved = Layout.from_json(state["layout"], path)
        old = RankLayout(tp=saved.tp, dp=saved.dp, pp=saved.pp)
        data = redeal([state["data"][old.rank(tp=0, dp=d, pp=0)] for d in range(old.dp)], state["step"])
        read_state(source, state["step"], state["adam_step"])
        moved = f"layout {saved.to_json()} -> {self.layout.to_json()}"
        return Resumed(step=state["step"], run_id=state["run_id"], data=data, rng=None,
                       changes=[moved, *self._changes(path)])

    def _check_model(self, path: Path, saved: dict) -> None:
        current = dataclasses.asdict(self.cfg.model)
        shape = [k for k in current if k not in self.cfg.model.training_only_fields()]
        differs = {k: (saved.get(k), current[k]) for k in shape if saved.get(k) != current[k]}
        if differs:
            what = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(differs.items()))
            raise CheckpointError(f"checkpoint {path} is for another model shape ({what}); resume with its config "
                                  f"({path / CONFIG}) or start a new run directory")

    def _check_fits(self, path: Path) -> CheckpointMeta:
        meta = CheckpointMeta.read(path)
        self._check_model(path, meta.model)
        if meta.layout != self.layout:
            raise CheckpointError(f"checkpoint {path} was written with layout {meta.layout.to_json()} but this run "
                                  f"has {self.layout.to_json()}")
        return meta

    @staticmethod
    def _rank_state(path: Path, rank: int) -> tuple[dict, dict]:
        if rank_state_file(path, rank).is_file():
            return load_rank_state(rank_state_file(path, rank))
        if legacy_rank_state_file(path, rank).is_file():
            return load_legacy_rank_state(legacy_rank_state_file(path, rank))
        raise CheckpointError(f"checkpoint {path} lacks {rank_state_file(path, rank).name} (this rank's RNG and "
                              f"data position); it is incomplete: resume from another")

    def _changes(self, path: Path) -> list[str]:
        from gptscale import config

        try:
            saved = config.load(path / CONFIG).to_dict()
        except Exception:  # noqa: BLE001 - only a report: an unreadable old config changes nothing
            return []
        now = self.cfg.to_dict()
        return [f"{section}.{key}: {saved[section][key]!r} -> {value!r}" for section in ("model", "data", "train")
                for key, value in now[section].items() if saved[section].get(key) != value]
