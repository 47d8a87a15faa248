"""Write files so that a crash never leaves a half-written one under the final name, and make
what was written durable (fsync of files and of the folders that name them)."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open `path.tmp-PID` for writing; on success fsync and rename it to `path`, else remove it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder `path` (new names, renames, removals) durable. Some file
    systems (FUSE and object-store mounts, CIFS) refuse fsync on a folder: nothing to do there."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sync_filesystem(path: str | Path) -> None:
    """Flush everything this node has written to the file system holding `path` (Linux syncfs,
    elsewhere a full sync): one call per rank makes its part of a checkpoint durable, however
    many files DeepSpeed wrote (it syncs none of them)."""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (AttributeError, OSError):
        os.sync()
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(final: str | Path, *, replace: bool = False, make_parents: bool = False) -> Iterator[Path]:
    """A new folder `final`, written as `.NAME.partial-PID` beside it and renamed into place
    only when the block succeeds (removed if it fails): no reader ever sees half of it. An
    existing `final` is refused, never merged into; with `replace` (the caller has checked that
    it may go) it steps aside at the rename and is deleted after. `make_parents` creates the
    missing parent folders, and removes them again if the block fails."""
    import shutil

    from gptscale.errors import ConfigError

    final = Path(final)
    if final.exists() and not replace:
        raise ConfigError(f"output folder {final} already exists; choose a new one or remove it first")
    missing = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # nearest first
    if missing and not make_parents:
        raise ConfigError(f"the folder {final.parent} (parent of the output {final.name}) does not exist")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for folder, _, _ in os.walk(staging):
            fsync_dir(folder)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            try:
                os.rename(staging, final)
            except BaseException:
                os.rename(old, final)
                raise
            shutil.rmtree(old)
        else:
            os.rename(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
