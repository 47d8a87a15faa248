"""Sharded safetensors in the layout `transformers` uses, written tensor by tensor and read
slice by slice, so neither side ever holds more than one tensor.

    STEM.safetensors                        one shard: no index
    STEM-00001-of-00003.safetensors ...     several, and STEM.safetensors.index.json:
                                            {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

The safetensors format is simple enough to stream: 8 bytes of header length, a JSON header
naming each tensor's dtype, shape and byte range, then the bytes in that order. The header
needs every shape before the first byte, which the caller knows from the model's config.
Everything read here may come from elsewhere: the index may only name plain files beside
it, and a damaged file is reported by name.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptscale.errors import CheckpointError

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive entries packed into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_sharded(folder: Path, stem: str, entries: list[Entry], produce: Callable[[str], torch.Tensor],
                  max_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """Write `entries` (in order) with `produce(name)` giving each tensor when its turn comes;
    the index too if there is more than one shard. Returns the files written. `folder` is a
    staging folder: the caller renames it into place when everything is written."""
    shards = plan_shards(entries, max_bytes)
    files = shard_names(stem, len(shards))
    for file, shard in zip(files, shards):
        _write_one(folder / file, shard, produce, metadata or {}, progress)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries), **(metadata or {})},
                 "weight_map": {e.name: file for file, shard in zip(files, shards) for e in shard}}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write_one(path: Path, entries: list[Entry], produce, metadata: dict[str, str], progress) -> None:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            tensor = produce(e.name)
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise ValueError(f"{e.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {e.shape} {e.dtype}")
            f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))  # little-endian, no copy
            if progress:
                progress(1)
        f.flush()
        os.fsync(f.fileno())


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of its first byte


def read_header(path: Path) -> tuple[dict[str, Stored], dict[str, str]]:
    """(tensors, metadata) of one safetensors file, every field checked against the format and
    the file's size (a truncated or forged file is refused here, before any tensor is read)."""
    names = {name: dtype for dtype, name in DTYPE_NAMES.items()}

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({why}); it is damaged or truncated")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            length = struct.unpack("<Q", head)[0]
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise bad(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(type(exc).__name__) from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ is not a mapping of strings")
    data_start, tensors = 8 + length, {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = names[info["dtype"]], info["shape"], info["data_offsets"]
            if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
                raise ValueError("negative or non-integer sizes")
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks a known dtype, a shape or data offsets") from None
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or data_start + end > size:
            raise bad(f"{name} needs bytes {begin}..{end} of data, the file holds {size - data_start}")
        tensors[name] = Stored(path, dtype, tuple(shape), data_start + begin)
    return tensors, metadata


class ShardedSafetensors:
    """Read `STEM.safetensors` or its sharded form in `folder`: names, shapes and slices. Bytes
    are read with positioned reads into fresh tensors, never memory-mapped, so a process keeps
    in memory only what it asked for (mapped pages would count towards its RSS until closed)."""

    def __init__(self, folder: str | Path, stem: str = "model"):
        self.folder = Path(folder)
        index = self.folder / f"{stem}.safetensors.index.json"
        single = self.folder / f"{stem}.safetensors"
        listed: dict[str, str] = {}
        if index.is_file():
            listed = self._read_index(index)
            files = sorted(set(listed.values()))
        elif single.is_file():
            files = [single.name]
        else:
            raise CheckpointError(f"{self.folder} holds neither {single.name} nor {index.name}")
        self.stored: dict[str, Stored] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            tensors, metadata = read_header(self.folder / file)
            self.metadata = self.metadata or metadata
            for name, where in tensors.items():
                self.stored.setdefault(name, where)
        if listed:
            wrong = [n for n, f in listed.items() if n not in self.stored or self.stored[n].file.name != f]
            if wrong:
                raise CheckpointError(f"{index} names {wrong[:2]} in files that do not hold them; the folder is "
                                      f"damaged or mixed from two saves")

    @staticmethod
    def _read_index(index: Path) -> dict:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("weight_map is not a mapping of names to files")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); it is "
                                  f"damaged") from None
        bad = [f for f in weight_map.values() if Path(f).name != f or f.startswith(".") or not f.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{index} names {bad[0]!r}, not a .safetensors file beside it; refused")
        missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names {missing[0]}, which is missing; the folder is incomplete")
        return weight_map

    @property
    def names(self) -> list[str]:
        return list(self.stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def tensor(self, name: str) -> torch.Tensor:
        return self.slice(name, None)

    def slice(self, name: str, index: tuple | None) -> torch.Tensor:
        """`name`, or `tensor[index]` for a tuple of slices: a range of rows is read alone, a
        slice of another dimension from the whole tensor (one tensor, never the file)."""
        where = self._stored(name)
        index = index or ()
        rows = index[0] if index and where.shape else slice(None)
        if where.shape and rows.step in (None, 1):
            first, stop, _ = rows.indices(where.shape[0])
            stop, rest = max(first, stop), (slice(None), *index[1:])
        else:
            first, stop, rest = 0, (where.shape[0] if where.shape else 0), index
        out = self._read(name, where, first, stop)
        return out[rest].clone() if any(part != slice(None) for part in rest) else out

    @staticmethod
    def _read(name: str, where: Stored, first: int, stop: int) -> torch.Tensor:
        """Rows first..stop of the stored tensor (all of a 0-d one) into fresh memory."""
        shape = (stop - first, *where.shape[1:]) if where.shape else ()
        out = torch.empty(shape, dtype=where.dtype)
        row_bytes = out[0].numel() * out.element_size() if where.shape and len(out) else 0
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        try:
            with open(where.file, "rb") as f:
                f.seek(where.start + first * row_bytes)
                if f.readinto(buffer) != len(buffer):
                    raise OSError("short read")
        except OSError as exc:
            raise CheckpointError(f"{where.file}: cannot read {name} ({exc}); the file is damaged or truncated") from None
        return out

    def _stored(self, name: str) -> Stored:
        if name not in self.stored:
            raise CheckpointError(f"{self.folder} holds no tensor {name!r}")
        return self.stored[name]
