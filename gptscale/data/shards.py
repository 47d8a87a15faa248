"""Webdataset tar shards of token ids, and the manifest that describes them.

A shard is a plain tar that `webdataset.WebDataset(url)` reads: per document a key
`DDDDDDDDDD` (its index in the split) with members `KEY.npy` (token ids, uint16 when the
vocabulary fits, else uint32; no end-of-text token: the loader adds it) and `KEY.json`
(source, name, token count). Fine-tuning shards ('gptscale data prepare-sft', see
gptscale/data/sft.py) add a `KEY.mask.npy` per example and mark the manifest with
`"kind": "sft"` and `"seq_len"`; a manifest without a kind describes pretraining documents.
Tar headers carry no time, owner or host, so the same input gives byte-identical shards.
Every file is written under a temporary name and renamed when complete; the manifest is
written last, so a folder with a manifest is complete.

A manifest may come from elsewhere: `read_manifest` checks its whole structure, shard and
tokenizer names must be plain file names inside the folder (no `pipe:`, `/` or `..`), and
`split_urls` returns resolved local paths, which the loader opens as plain files.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptscale.atomic import atomic_write, write_text_atomic
from gptscale.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "gptscale-shards/1"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
KINDS = ("sft",)  # a manifest's optional "kind"; without one a folder holds pretraining documents


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type holding every id below `vocab_size` (the largest id + 1)."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    documents: int
    tokens: int
    bytes: int
    sha256: str


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Writes `{prefix}-{NNNNNN}.tar` shards of at most ~`max_bytes` each into `out_dir`."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int, dtype: np.dtype):
        if max_bytes < 4096:
            raise DataError(f"--shard-size {max_bytes} bytes is too small; use at least 4KB (typical: 64MB)")
        self.out_dir, self.prefix, self.max_bytes, self.dtype = out_dir, prefix, max_bytes, dtype
        self.shards: list[ShardInfo] = []
        self.documents = 0  # in this split, across shards: the next document's key
        self._file = self._tar = self._ctx = None
        self._open_docs = self._open_tokens = 0

    def add(self, tokens: np.ndarray, meta: dict, extra: dict[str, bytes] | None = None) -> None:
        """One document: `KEY.npy`, then each `KEY.{suffix}` of `extra` (e.g. SFT's `mask.npy`), then `KEY.json`."""
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(tokens.max())} of {meta.get('name', 'a document')} does not fit the "
                            f"shards' {self.dtype.name}; the tokenizer has ids beyond its vocabulary size")
        payload = npy_bytes(tokens.astype(self.dtype, copy=False))
        info = json.dumps({**meta, "tokens": int(tokens.size)}, sort_keys=True).encode()
        extra = extra or {}
        # a header and padding per member, and the end-of-archive blocks, roughly
        size = len(payload) + len(info) + sum(map(len, extra.values())) + (3 + 2 * len(extra)) * 512
        if self._tar is not None and self._file.tell() + size > self.max_bytes:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        key = f"{self.documents:010d}"
        _tar_member(self._tar, f"{key}.npy", payload)
        for suffix, data in extra.items():
            _tar_member(self._tar, f"{key}.{suffix}", data)
        _tar_member(self._tar, f"{key}.json", info)
        self.documents += 1
        self._open_docs += 1
        self._open_tokens += int(tokens.size)

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file goes; finished shards stay)."""
        if self._ctx is not None:
            self._tar.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._ctx = self._tar = self._file = None

    def _path(self) -> Path:
        return self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"

    def _open_shard(self) -> None:
        self._ctx = atomic_write(self._path())
        self._file = self._ctx.__enter__()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._open_docs = self._open_tokens = 0

    def _close_shard(self) -> None:
        self._tar.close()
        path = self._path()
        self._ctx.__exit__(None, None, None)  # fsync + rename into place
        self.shards.append(ShardInfo(name=path.name, documents=self._open_docs, tokens=self._open_tokens,
                                     bytes=path.stat().st_size, sha256=file_sha256(path)))
        self._ctx = self._tar = self._file = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder, its structure checked (it may come from elsewhere)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; is {str(folder)!r} a folder made by 'gptscale data prepare' "
                        f"(and did it finish)?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DataError(f"{path}: format {found!r} is not {FORMAT!r}; re-run 'gptscale data prepare'")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}; the manifest is damaged or not gptscale's (re-run 'gptscale data prepare')")

    def need(mapping, key: str, kind, where: str):
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise bad(f"{where}{key} must be {'a non-negative integer' if kind is int else kind.__name__}")
        return value

    tokenizer = need(manifest, "tokenizer", dict, "")
    vocab = need(tokenizer, "vocab_size", int, "tokenizer.")
    for key in ("eos_id", "pad_id"):
        if need(tokenizer, key, int, "tokenizer.") >= vocab:
            raise bad(f"tokenizer.{key} {tokenizer[key]} is not below tokenizer.vocab_size {vocab}")
    need(tokenizer, "sha256", str, "tokenizer.")
    need(manifest, "text_bytes", int, "")
    if not isinstance(manifest.get("sources"), list) or not all(isinstance(x, str) for x in manifest["sources"]):
        raise bad("sources must be a list of strings")
    if not FOLDER_NAME.fullmatch(need(tokenizer, "folder", str, "tokenizer.")):
        raise bad(f"tokenizer.folder {tokenizer['folder']!r} is not a plain folder name")
    need(manifest, "dtype", str, "")
    if "kind" in manifest:  # absent: pretraining shards ('gptscale data prepare'); "sft": 'prepare-sft'
        if manifest["kind"] not in KINDS:
            raise bad(f"kind {manifest['kind']!r} is not one of {list(KINDS)}")
        if need(manifest, "seq_len", int, "") < 1:
            raise bad("seq_len must be at least 1")
    for split, info in need(manifest, "splits", dict, "").items():
        for key in ("documents", "tokens"):
            need(info, key, int, f"splits.{split}.")
        for i, shard in enumerate(need(info, "shards", list, f"splits.{split}.")):
            where = f"splits.{split}.shards[{i}]."
            name = need(shard, "name", str, where)
            if not SHARD_NAME.fullmatch(name):
                raise bad(f"shard name {name!r} is not a plain file name ending in .tar")
            for key in ("documents", "tokens", "bytes"):
                need(shard, key, int, where)
            if not re.fullmatch(r"[0-9a-f]{64}", need(shard, "sha256", str, where)):
                raise bad(f"{where}sha256 is not a sha256 hex digest")


def shard_checks(folder: str | Path, split: str, manifest: dict | None = None) -> list[tuple[str, ShardInfo]]:
    """(resolved local path, what the manifest says of it) for each shard of a split; each must exist."""
    manifest = manifest or read_manifest(folder)
    if split not in manifest["splits"]:
        raise DataError(f"{Path(folder) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    root = Path(folder).resolve()
    found = []
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["name"]  # a plain name (checked): stays inside the folder
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing; restore it or re-run prepare")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard {path} holds {path.stat().st_size:,} bytes, {Path(folder) / MANIFEST} lists "
                            f"{shard['bytes']:,}; it was changed or damaged: restore it or re-run prepare")
        found.append((str(path), ShardInfo(**{k: shard[k] for k in ("name", "documents", "tokens", "bytes", "sha256")})))
    return found


def split_urls(folder: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    """Local paths of a split's shards, checking that each exists."""
    return [path for path, _ in shard_checks(folder, split, manifest)]


def shard_info_dicts(shards: list[ShardInfo]) -> list[dict]:
    return [asdict(s) for s in shards]


def matching_tokenizer(folder: str | Path, manifest: dict, tokenizer_path: str | Path | None = None):
    """The tokenizer to read `folder`'s shards with: the given one or the copy beside the
    shards; refuses one whose hash differs from the one the shards were made with."""
    from gptscale.data.tokenizer import TextTokenizer

    path = tokenizer_path or Path(folder) / manifest["tokenizer"]["folder"]  # a plain name (read_manifest)
    tokenizer = TextTokenizer.load(path)
    expected = manifest["tokenizer"]["sha256"]
    if tokenizer.sha256 != expected:
        raise DataError(f"tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:12]}...) is not the one the shards "
                        f"in {folder} were made with (sha256 {expected[:12]}...); use {Path(folder) / 'tokenizer'} "
                        f"or re-run 'gptscale data prepare' with this tokenizer")
    return tokenizer
