"""Reading one token shard, trusting nothing in it.

Members must be named after a document index (digits; `../x` or `/abs` names are an error);
only `.npy` (with allow_pickle=False), `.json` and SFT's `.mask.npy` members are read (any
other member, .pyd, .pickle, ..., is skipped unread; `read_shard_records` hands callers the
raw `.json` / `.mask.npy` bytes, to decode with json / `unsigned_array`); member sizes are
checked against a cap before they are read; local shards are opened as plain files (`pipe:`
and URLs only when a caller names them explicitly, never from a manifest); a shard of a
prepared folder is checked against the manifest's sha256 and document count as it is read;
a shard cut short, even at a member boundary, is an error.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import numpy as np

from gptscale.data.shards import ShardInfo
from gptscale.errors import DataError

MEMBER_KEY = re.compile(r"\d{1,12}")  # a document's index: digits only, never a path
# a 128M-token document; its metadata; an SFT example's loss mask (one byte per token)
MAX_MEMBER_BYTES = {"npy": 256 << 20, "json": 1 << 20, "mask.npy": 128 << 20}


class _TailRecorder:
    """A read-only stream that remembers the last block it returned and hashes what it read.

    Python's tarfile treats end-of-file where a header should be as the end of the archive,
    so a tar cut at a member boundary reads as a shorter, valid one. A complete archive
    ends with zero blocks, and tarfile reads the first of them; a cut one does not.
    """

    def __init__(self, stream):
        self.stream, self.tail, self.sha256 = stream, b"", hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail = (self.tail + data)[-512:]
            self.sha256.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what tarfile left: the end-of-archive padding."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()

    @property
    def ended_with_marker(self) -> bool:
        return len(self.tail) == 512 and not any(self.tail)


def _open(url: str):
    """Local paths as plain files; `pipe:` and URLs (given explicitly, never from a manifest) by webdataset."""
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    return open(url, "rb")


def read_shard(url: str, vocab_size: int, expected: ShardInfo | None = None) -> list[np.ndarray]:
    """All documents of a shard as arrays of their stored unsigned dtype, in file order; clear
    errors for bad shards, and for one that differs from what its manifest says (`expected`)."""
    return [tokens for _, tokens, _ in read_shard_records(url, vocab_size, expected)]


def read_shard_records(url: str, vocab_size: int,
                       expected: ShardInfo | None = None) -> list[tuple[str, np.ndarray, dict[str, bytes]]]:
    """`read_shard`, keeping per document its key and the raw bytes of its other read members
    ({"json": ..., "mask.npy": ...} where present; the .json is already checked to parse)."""
    docs: list[tuple[str, np.ndarray, dict[str, bytes]]] = []
    try:
        stream = _TailRecorder(_open(url))
        try:
            for key, members in _documents(tarfile.open(fileobj=stream, mode="r|"), url):
                tokens = _decode_tokens(members, key, url, vocab_size)
                docs.append((key, tokens, {k: v for k, v in members.items() if k != "npy"}))
            stream.drain()
        finally:
            stream.close()
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"shard {url} cannot be read ({type(exc).__name__}: {exc}); it is truncated, corrupt "
                        f"or missing: restore it or re-run 'gptscale data prepare'") from None
    if url.endswith(".tar") and not stream.ended_with_marker:
        raise DataError(f"shard {url} is truncated (no end-of-archive marker after {len(docs)} documents): "
                        f"restore it or re-run 'gptscale data prepare'")
    if expected is not None:
        digest = stream.sha256.hexdigest()
        if digest != expected.sha256 or len(docs) != expected.documents:
            raise DataError(f"shard {url} is not what its manifest lists (sha256 {digest[:12]}... with {len(docs)} "
                            f"documents, expected {expected.sha256[:12]}... with {expected.documents}): it was changed "
                            f"or damaged; restore it or re-run 'gptscale data prepare'")
    return docs


def _documents(tar: tarfile.TarFile, url: str):
    """(key, {suffix: bytes}) per document, members read only after their names and sizes pass."""
    key, members = None, {}
    with tar:
        for info in tar:
            stem, _, suffix = info.name.partition(".")
            if not (info.isfile() and MEMBER_KEY.fullmatch(stem)):
                raise DataError(f"shard {url}: member {info.name!r} is not named after a document (digits, then "
                                f".npy or .json); the shard is not gptscale's")
            if suffix in MAX_MEMBER_BYTES and info.size > MAX_MEMBER_BYTES[suffix]:
                raise DataError(f"shard {url}: member {info.name} holds {info.size:,} bytes, more than the "
                                f"{MAX_MEMBER_BYTES[suffix]:,} a .{suffix} member may have")
            if stem != key and key is not None:
                yield key, members
                members = {}
            key = stem
            if suffix in MAX_MEMBER_BYTES:  # .pyd, .pickle, ...: skipped unread, never decoded
                members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _decode_tokens(members: dict, key: str, url: str, vocab_size: int) -> np.ndarray:
    if "npy" not in members:
        raise DataError(f"shard {url}: document {key} has no .npy member (members: {sorted(members)})")
    tokens = _token_array(members["npy"], f"shard {url}: document {key}")
    if int(tokens.max()) >= vocab_size:
        raise DataError(f"shard {url}: document {key} has token id {int(tokens.max())} >= vocab size "
                        f"{vocab_size}; the shards were made with another tokenizer")
    if "json" in members:
        try:
            json.loads(members["json"])  # metadata must at least parse; nothing else is decoded
        except (ValueError, RecursionError) as exc:
            raise DataError(f"shard {url}: member {key}.json is not valid JSON ({type(exc).__name__})") from None
    return tokens


def unsigned_array(payload: bytes, where: str) -> np.ndarray:
    """A `.npy` member (e.g. an SFT loss mask) as a non-empty 1-D unsigned array, checked as token arrays are."""
    return _token_array(payload, where)


def _token_array(payload: bytes, where: str) -> np.ndarray:
    """A .npy member as a 1-D unsigned array, its header checked against its size first (np.load
    allocates whatever shape the header declares before reading a byte of data)."""
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise DataError(f"{where}: .npy is not a plain array ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: .npy is not a plain array (it holds Python objects; never unpickled)")
    if len(shape) != 1 or dtype.kind != "u" or shape[0] == 0:
        raise DataError(f"{where} holds {dtype} {shape}, not a non-empty 1-D array of unsigned token ids")
    if shape[0] * dtype.itemsize != len(payload) - stream.tell():
        raise DataError(f"{where}: .npy declares {shape[0]:,} {dtype} ids but holds {len(payload) - stream.tell():,} "
                        f"bytes of data; the member is damaged")
    return np.frombuffer(payload, dtype=dtype, count=shape[0], offset=stream.tell()).copy()
