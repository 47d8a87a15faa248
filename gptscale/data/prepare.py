"""`gptscale data prepare`: documents -> tokenized webdataset shards + manifest.

Documents are read in a deterministic order, tokenized in batches by a pool of worker
processes (results come back in order), assigned to train or validation by a hash of
their stable name (or, with `val_chunk`, cut into chunks of that many tokens, each chunk
assigned by a hash of its document's name and index), and written as shards. The tokenizer is copied next to the shards so
the folder is self-contained. The same input gives byte-identical shards.

Preparing a folder again in place (`--tokenizer OUT/tokenizer --out OUT --overwrite`) is
safe: the tokenizer is copied aside before anything in OUT is touched, the old manifest
goes first (the folder stops looking complete), and the new tokenizer folder replaces the
old one by rename at the end.
"""
from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from gptscale.data.shards import FORMAT, MANIFEST, ShardWriter, shard_info_dicts, token_dtype, write_manifest
from gptscale.data.sources import Document, ReadOptions, read_documents
from gptscale.data.tokenizer import TextTokenizer
from gptscale.errors import DataError

TOKENIZER_DIR = "tokenizer"
_worker_tokenizers: dict[str, TextTokenizer] = {}  # per process, by path


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by document: the first 8 bytes of sha256(name) as a fraction."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def split_pieces(name: str, tokens: int, val_fraction: float, val_chunk: int = 0) -> list[tuple[int, int, bool]]:
    """(start, end, held out) token ranges of one document, in order.

    val_chunk=0: the whole document goes one way (`is_validation(name)`). val_chunk>0: the
    document is cut into chunks of val_chunk tokens; chunk i is held out when
    `is_validation(f"{name}#{i}")`, so validation is drawn from every kind of document in the
    corpus, not from a handful of whole ones. Neighbouring chunks that go the same way stay one
    range, so a training document is broken (and gets an EOS) only where a chunk was held out."""
    if val_chunk <= 0:
        return [(0, tokens, is_validation(name, val_fraction))]
    pieces: list[tuple[int, int, bool]] = []
    for start in range(0, tokens, val_chunk):
        end, held = min(start + val_chunk, tokens), is_validation(f"{name}#{start // val_chunk}", val_fraction)
        if pieces and pieces[-1][2] == held:
            pieces[-1] = (pieces[-1][0], end, held)
        else:
            pieces.append((start, end, held))
    return pieces


def parse_size(text: str) -> int:
    """'64MB' -> 67108864; plain numbers are bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    value = text.strip().upper()
    for unit, scale in units.items():
        if value.endswith(unit):
            number = value.removesuffix(unit).strip()
            break
    else:
        number, scale = value, 1
    try:
        size = float(number) * scale
    except ValueError:
        size = float("nan")
    if not 1 <= size <= 1 << 40:  # also refuses nan and inf
        raise DataError(f"--shard-size {text!r} is not a size between 1 byte and 1TB; write e.g. 64MB or 500KB")
    return int(size)


def _encode(job: tuple[str, list[str]]) -> list[np.ndarray]:
    """Token ids of a batch of texts. The tokenizer loads inside the task, not in a pool
    initializer: a failing initializer makes multiprocessing respawn workers forever."""
    path, texts = job
    if path not in _worker_tokenizers:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
        _worker_tokenizers[path] = TextTokenizer.load(path)
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_tokenizers[path].encode_batch(texts)]


def _batched(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _tokenized(documents: Iterable[Document], tokenizer: TextTokenizer, workers: int,
               batch: int = 32) -> Iterator[tuple[Document, np.ndarray]]:
    batches = _batched(documents, batch)
    if workers <= 1:
        for docs in batches:
            yield from zip(docs, _encode((tokenizer.path, [d.text for d in docs])))
        return
    # fork would copy a possibly multi-threaded parent; spawn is the safe start method.
    # Batches go out in bounded rounds so memory stays flat on corpora of any size.
    with mp.get_context("spawn").Pool(workers) as pool:
        for round_ in _batched(batches, 4 * workers):
            encoded = pool.map(_encode, [(tokenizer.path, [d.text for d in docs]) for docs in round_])
            for docs, arrays in zip(round_, encoded):
                yield from zip(docs, arrays)


def _clear_output(out: Path, overwrite: bool) -> None:
    """Remove the shards and manifest of an earlier prepare (with --overwrite), the manifest first."""
    existing = sorted((p for p in out.iterdir() if p.name == MANIFEST or p.suffix == ".tar" or ".tar.tmp-" in p.name),
                      key=lambda p: p.name != MANIFEST)
    if existing and not overwrite:
        raise DataError(f"{out} already holds shards or a manifest; pass --overwrite to replace them "
                        f"or choose another --out")
    for p in existing:
        p.unlink()


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer's JSON files (tokenizer.json and its configs) into a new folder `target`."""
    shutil.copytree(source, target, ignore=lambda d, names: [n for n in names if not n.endswith(".json")])


def _install_tokenizer(source: Path, out: Path) -> None:
    """OUT/tokenizer replaced by a copy of `source`, by rename (an old one is removed only after)."""
    staged = out / f"{TOKENIZER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    copy_tokenizer(source, staged)
    old = out / f"{TOKENIZER_DIR}.old-{os.getpid()}"
    if (out / TOKENIZER_DIR).exists():
        os.replace(out / TOKENIZER_DIR, old)
    os.replace(staged, out / TOKENIZER_DIR)
    shutil.rmtree(old, ignore_errors=True)


def prepare(inputs: list[str], tokenizer_path: str, out_dir: str | Path, *, shard_bytes: int = 64 << 20,
            val_fraction: float = 0.01, workers: int | None = None, options: ReadOptions | None = None,
            overwrite: bool = False, progress: bool = True, val_chunk: int = 0) -> dict:
    """Tokenize `inputs` into train/val shards in `out_dir`; returns the manifest written.
    `val_chunk` > 0 holds out chunks of that many tokens instead of whole documents (split_pieces)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if type(val_chunk) is not int or val_chunk < 0:
        raise DataError(f"--val-chunk {val_chunk!r} must be a whole number of tokens >= 0 (0: whole documents)")
    if not inputs:
        raise DataError("no --input given")
    options = options or ReadOptions()
    with tempfile.TemporaryDirectory(prefix="gptscale-tokenizer-") as aside:
        # The tokenizer may live inside OUT (OUT/tokenizer): work from a copy made before OUT is touched.
        copy_tokenizer(Path(TextTokenizer.load(tokenizer_path).path).parent, Path(aside) / TOKENIZER_DIR)
        tokenizer = TextTokenizer.load(Path(aside) / TOKENIZER_DIR)
        return _prepare(inputs, tokenizer, Path(out_dir), shard_bytes, val_fraction, val_chunk, workers, options,
                        overwrite, progress)


def _prepare(inputs: list[str], tokenizer: TextTokenizer, out: Path, shard_bytes: int, val_fraction: float,
             val_chunk: int, workers: int | None, options: ReadOptions, overwrite: bool, progress: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, overwrite)

    writers = {split: ShardWriter(out, split, shard_bytes, dtype) for split in ("train", "val")}
    workers = workers or os.cpu_count() or 1
    text_bytes = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for doc, ids in _tokenized(read_documents(inputs, options), tokenizer, workers):
            if ids.size == 0:
                options.bad(doc.name, doc.source, "document has no tokens")
                continue
            pieces = split_pieces(doc.name, int(ids.size), val_fraction, val_chunk)
            for start, end, held_out in pieces:
                name = doc.name if len(pieces) == 1 else f"{doc.name}#{start}:{end}"
                writers["val" if held_out else "train"].add(ids[start:end], {"source": doc.source, "name": name})
            text_bytes += len(doc.text.encode("utf-8"))
            bar.update(1)
            bar.set_postfix_str(f"{text_bytes / 1e6:.1f} MB text", refresh=False)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()

    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {"documents": writer.documents, "tokens": sum(s.tokens for s in shards),
                         "shards": shard_info_dicts(shards)}
    if splits["train"]["documents"] == 0:
        raise DataError(f"inputs {inputs} gave no training documents; check the inputs "
                        f"(and --val-fraction {val_fraction})")
    _install_tokenizer(Path(tokenizer.path).parent, out)
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "sources": list(inputs),
        "text_bytes": text_bytes,
        "val_fraction": val_fraction,
        "val_chunk": val_chunk,
        "skipped": dict(options.skipped),
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id, "folder": TOKENIZER_DIR},
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest
