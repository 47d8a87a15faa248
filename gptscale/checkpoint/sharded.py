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
from typing import Callable, Iterable

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


class ShardedSafetensors:
    """Read `STEM.safetensors` or its sharded form in `folder`: names, shapes and slices."""

    def __init__(self, folder: str | Path, stem: str = "model"):
        from safetensors import SafetensorError, safe_open

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
        self._handles = {}
        self.where: dict[str, str] = {}
        for file in files:
            try:
                handle = safe_open(str(self.folder / file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.folder / file} is not a readable safetensors file "
                                      f"({str(exc).splitlines()[0][:160]}); it is damaged or truncated") from None
            self._handles[file] = handle
            for name in handle.keys():
                self.where.setdefault(name, file)
        if listed:
            wrong = [n for n, f in listed.items() if self.where.get(n) != f]
            if wrong:
                raise CheckpointError(f"{index} names {wrong[:2]} in files that do not hold them; the folder is "
                                      f"damaged or mixed from two saves")
        self.metadata: dict[str, str] = next(iter(self._handles.values())).metadata() or {}

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
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self.slice(name, None)

    def slice(self, name: str, index) -> torch.Tensor:
        """`name`, or only `index` of it (a tuple of slices): nothing else is read from disk."""
        from safetensors import SafetensorError

        if name not in self.where:
            raise CheckpointError(f"{self.folder} holds no tensor {name!r}")
        try:
            part = self._handles[self.where[name]].get_slice(name)
            return part[index] if index is not None else part[:]
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.folder / self.where[name]}: cannot read {name} "
                                  f"({str(exc).splitlines()[0][:160]}); the file is damaged or truncated") from None


def iter_entries(names: Iterable[str], shapes: dict[str, torch.Size], dtype: torch.dtype) -> list[Entry]:
    return [Entry(name, tuple(shapes[name]), dtype) for name in names]
