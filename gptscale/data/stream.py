"""Streaming loader over webdataset token shards, with exact resume.

The stream one loader worker produces is a pure function of (seed, epoch, its global
worker index, the shard list), so it can be restarted from a small state:

1. Shards. Each epoch, a corpus' shards are permuted by a seeded RNG and dealt round-robin
   to the dp_size x num_workers global workers (DP rank major, worker minor).
2. Shuffle buffer. A worker reads its shards in groups of `shuffle_shards` and emits the
   documents of a group in a seeded random order (a block shuffle: the buffer is the
   group). `shuffle_shards=0` keeps file order (validation).
3. Packing. Documents, each followed by EOS, are concatenated and cut into windows of
   seq_len + 1 tokens that overlap by one token, so every token is a label exactly once
   and windows cross document boundaries without loss. A finite stream's last partial
   window is padded (labels -100 there).
4. Mixture. Several corpora are mixed by weight: window n of a worker comes from the
   corpus drawn by a counter-based RNG seeded with (seed, worker, n // 4096).

The state after each window is (windows emitted, and per corpus the position of the next
window's first token: epoch, group, document, offset). Each batch carries its worker's
state to the main process, which remembers the state of the last batch it handed to the
training loop; DataLoader's round-robin over workers is restored by rotating logical
worker ids. Resuming replays at most one shuffle group per worker (to rebuild its order).

Shards are read by `data/read.py`, which trusts nothing in them. Token ids keep their stored
width until windows are cut. The resume state names shards by content (sha256), so a folder
may move.
"""
from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gptscale.data.read import read_shard
from gptscale.data.shards import MANIFEST, ShardInfo, shard_checks
from gptscale.errors import DataError
from gptscale.parallel.layers import IGNORE_INDEX

MIX_BLOCK = 4096
STATE_VERSION = 2


@dataclass(frozen=True)
class Corpus:
    """One weighted source of shards: `urls` are local paths, `pipe:` commands or http(s) URLs
    (as the caller gives them). `shards`, where known (a prepared folder), is what its manifest
    says of each url: the loader checks every shard against it as it reads."""

    urls: tuple[str, ...]
    weight: float = 1.0
    name: str = ""
    shards: tuple[ShardInfo, ...] | None = None

    def expected(self, url: str) -> ShardInfo | None:
        return None if self.shards is None else self.shards[self.urls.index(url)]

    def content(self) -> list[str]:
        """What identifies the data for resuming: the shards' sha256 where known, else the urls."""
        return [s.sha256 for s in self.shards] if self.shards is not None else list(self.urls)


def expand_urls(spec: str | list[str] | tuple[str, ...], split: str = "train") -> list[str]:
    """A prepared folder (its split's shards), brace patterns, or a list of either -> shard URLs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        if Path(item).is_dir() and (Path(item) / MANIFEST).is_file():
            urls.extend(path for path, _ in shard_checks(item, split))
            continue
        for url in braceexpand(item):
            if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
                raise DataError(f"shard {url} does not exist; check the path or pattern {item!r}")
            urls.append(url)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    return urls


def corpus_from(path: str, split: str, weight: float = 1.0) -> Corpus:
    """A prepared folder's split (checked against its manifest), or shard urls / patterns."""
    if Path(path).is_dir() and (Path(path) / MANIFEST).is_file():
        checks = shard_checks(path, split)
        return Corpus(urls=tuple(p for p, _ in checks), weight=weight, name=f"{path}:{split}",
                      shards=tuple(info for _, info in checks))
    return Corpus(urls=tuple(expand_urls(path, split)), weight=weight, name=f"{path}:{split}")


# -- positions, documents and windows of one corpus for one worker ------------------------

@dataclass(frozen=True)
class Position:
    """Where the next window starts: token `offset` of document `doc` of shuffle group
    `group` of epoch `epoch` (in this worker's order)."""

    epoch: int = 0
    group: int = 0
    doc: int = 0
    offset: int = 0


@dataclass(frozen=True)
class StreamSpec:
    seq_len: int
    vocab_size: int
    eos_id: int
    pad_id: int
    seed: int = 0
    shuffle_shards: int = 2  # shards per shuffle group; 0 = no shuffling at all
    epochs: int | None = None  # None: forever


class CorpusStream:
    """The documents one global worker reads from one corpus, from any Position on."""

    def __init__(self, corpus: Corpus, corpus_index: int, worker: int, workers: int, spec: StreamSpec):
        if len(corpus.urls) < workers:
            raise DataError(f"corpus {corpus.name or corpus.urls[0]!r} has {len(corpus.urls)} shards but "
                            f"{workers} readers (dp ranks x loader workers) each need at least one; re-run "
                            f"prepare with a smaller --shard-size or use fewer loader workers")
        self.corpus, self.index, self.worker, self.workers, self.spec = corpus, corpus_index, worker, workers, spec

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.index, *keys])

    def groups(self, epoch: int) -> list[list[str]]:
        urls = self.corpus.urls
        order = self._rng(epoch).permutation(len(urls)) if self.spec.shuffle_shards else np.arange(len(urls))
        mine = [urls[i] for i in order[self.worker::self.workers]]
        size = max(1, self.spec.shuffle_shards)
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def documents(self, start: Position) -> Iterator[tuple[Position, np.ndarray]]:
        epoch = start.epoch
        while self.spec.epochs is None or epoch < self.spec.epochs:
            groups = self.groups(epoch)
            for g in range(start.group if epoch == start.epoch else 0, len(groups)):
                docs = [doc for url in groups[g]
                        for doc in read_shard(url, self.spec.vocab_size, self.corpus.expected(url))]
                order = (self._rng(epoch, self.worker, g).permutation(len(docs)) if self.spec.shuffle_shards
                         else np.arange(len(docs)))
                first = start.doc if (epoch, g) == (start.epoch, start.group) else 0
                for d in range(first, len(docs)):
                    yield Position(epoch, g, d, 0), docs[order[d]]
            epoch += 1


def pack_windows(stream: CorpusStream, start: Position) -> Iterator[tuple[np.ndarray, np.ndarray, Position]]:
    """(input_ids, labels, position of the next window) for consecutive packed windows."""
    spec = stream.spec
    length = spec.seq_len
    buffer = np.empty(0, dtype=np.int64)
    # Where each document's tokens begin in `buffer`: [position, offset in the doc of its first buffered token, index]
    segments: list[list] = []
    for position, doc in stream.documents(start):
        tokens = np.append(doc, spec.eos_id)
        offset = start.offset if (position.epoch, position.group, position.doc) == (start.epoch, start.group, start.doc) else 0
        segments.append([position, offset, len(buffer)])
        buffer = np.concatenate([buffer, tokens[offset:]])
        while len(buffer) >= length + 1:
            window = buffer[:length + 1]
            buffer = buffer[length:]  # the last token of this window starts the next one
            for seg in segments:
                seg[2] -= length
            while len(segments) > 1 and segments[1][2] <= 0:
                segments.pop(0)
            head = segments[0]
            if head[2] < 0:  # the next window starts inside this document
                head[1], head[2] = head[1] - head[2], 0
            yield window[:-1].copy(), window[1:].copy(), replace(head[0], offset=head[1])
    if len(buffer) >= 2:  # finite stream: the tail, padded
        inputs = np.full(length, spec.pad_id, dtype=np.int64)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        inputs[:len(buffer) - 1], labels[:len(buffer) - 1] = buffer[:-1], buffer[1:]
        yield inputs, labels, Position(epoch=spec.epochs or 0)


# -- mixing corpora, batching per worker ---------------------------------------------------

@dataclass
class WorkerState:
    windows: int = 0
    positions: list[Position] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"windows": self.windows, "positions": [asdict(p) for p in self.positions]}

    @classmethod
    def from_dict(cls, data: dict) -> "WorkerState":
        return cls(windows=data["windows"], positions=[Position(**p) for p in data["positions"]])


def mixed_windows(corpora: list[Corpus], spec: StreamSpec, worker: int, workers: int,
                  state: WorkerState) -> Iterator[tuple[np.ndarray, np.ndarray, WorkerState]]:
    """Windows of all corpora, interleaved by weight; ends when any finite corpus ends."""
    positions = list(state.positions) or [Position() for _ in corpora]
    sources = [pack_windows(CorpusStream(c, i, worker, workers, spec), positions[i]) for i, c in enumerate(corpora)]
    weights = np.array([c.weight for c in corpora], dtype=np.float64)
    weights /= weights.sum()
    n, block, draws = state.windows, -1, None
    while True:
        if len(corpora) == 1:
            choice = 0
        else:
            if n // MIX_BLOCK != block:
                block = n // MIX_BLOCK
                draws = np.random.default_rng([spec.seed, 7919, worker, block]).choice(
                    len(corpora), size=MIX_BLOCK, p=weights)
            choice = int(draws[n % MIX_BLOCK])
        try:
            inputs, labels, positions[choice] = next(sources[choice])
        except StopIteration:
            return
        n += 1
        yield inputs, labels, WorkerState(n, list(positions))


@dataclass(frozen=True)
class LoaderPlan:
    corpora: tuple[Corpus, ...]
    spec: StreamSpec
    micro_batch: int
    dp_rank: int
    dp_size: int
    num_workers: int  # 0: read in the training process


class _WorkerBatches(IterableDataset):
    """What one DataLoader worker runs: its share of the stream, batched, with its state."""

    def __init__(self, plan: LoaderPlan, start: dict[int, dict], rotation: int):
        super().__init__()
        self.plan, self.start, self.rotation = plan, start, rotation

    def __iter__(self):
        plan = self.plan
        readers = max(1, plan.num_workers)
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % readers
        state = WorkerState.from_dict(self.start[logical]) if logical in self.start else WorkerState()
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        windows = mixed_windows(list(plan.corpora), plan.spec, plan.dp_rank * readers + logical,
                                plan.dp_size * readers, state)
        try:
            for inputs, labels, state in windows:
                rows.append((inputs, labels))
                if len(rows) == plan.micro_batch:
                    yield self._collate(rows, logical, state)
                    rows = []
        except DataError as err:
            # Handed to the rank as data: an exception raised in a loader worker reaches the rank
            # wrapped in the worker's whole traceback, and the message must stay one line.
            yield {"error": str(err)}
            return
        if rows:
            yield self._collate(rows, logical, state)

    @staticmethod
    def _collate(rows, worker: int, state: WorkerState) -> dict:
        return {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
                "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
                "worker": worker, "state": state.to_dict()}


def _check_state(state) -> None:
    """A loader state read from a checkpoint has the shape state_dict() gives (or is one error)."""
    def ints(*values) -> bool:
        return all(type(v) is int and v >= 0 for v in values)

    try:
        workers = state["workers"]
        ok = (ints(state["version"], state["seed"], state["batches"], state["dp_size"], state["num_workers"],
                   state["next_worker"])
              and all(isinstance(c, list) and all(isinstance(u, str) for u in c) for c in state["corpora"])
              and isinstance(workers, dict)
              and all(k.isdigit() and ints(w["windows"]) and all(
                  set(p) == {"epoch", "group", "doc", "offset"} and ints(*p.values()) for p in w["positions"])
                  for k, w in workers.items()))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise DataError("the data loader state in the checkpoint is damaged or not gptscale's; resume from another "
                        "checkpoint")


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # A scheduler's SIGTERM (and SLURM's SIGUSR1) reaches every process of the job: the rank
    # decides what happens (finish the step, save, stop its workers), not the worker, whose
    # death would make the rank's DataLoader fail before it could save.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StreamingLoader:
    """Batches of (input_ids, labels), each (micro_batch, seq_len) int64, for one DP rank.

    state_dict() describes exactly what has been handed out; a loader given it by
    load_state_dict() continues with the very next batch of the uninterrupted run.
    """

    def __init__(self, corpora: list[Corpus], spec: StreamSpec, *, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2):
        if not corpora:
            raise DataError("no corpus given to the loader")
        if micro_batch < 1 or spec.seq_len < 1:
            raise DataError(f"micro_batch={micro_batch} and seq_len={spec.seq_len} must be >= 1")
        if any(c.weight <= 0 for c in corpora):
            raise DataError(f"corpus weights {[c.weight for c in corpora]} must all be > 0")
        self.plan = LoaderPlan(tuple(corpora), spec, micro_batch, dp_rank, dp_size, num_workers)
        self.prefetch_factor = prefetch_factor
        self._states: dict[int, dict] = {}  # logical worker -> state after its last consumed batch
        self._next_worker = 0
        self.batches = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, input_ids, labels in self.iter_tagged():
            yield input_ids, labels

    def iter_tagged(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Like iteration, with the global reader (dp_rank * workers + worker) that made each batch."""
        readers = max(1, self.plan.num_workers)
        dataset = _WorkerBatches(self.plan, dict(self._states), self._next_worker)
        extra = {} if self.plan.num_workers == 0 else dict(
            prefetch_factor=self.prefetch_factor, worker_init_fn=_loader_worker_init)
        # A generator of its own: torch's default one would give the workers' base seed from the
        # training RNG, at the first batch, and so shift dropout differently in a resumed run.
        generator = torch.Generator().manual_seed(self.plan.spec.seed)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.plan.num_workers, generator=generator, **extra)
        for batch in loader:
            if "error" in batch:
                raise DataError(batch["error"])
            self._states[batch["worker"]] = batch["state"]
            self._next_worker = (batch["worker"] + 1) % readers
            self.batches += 1
            yield self.plan.dp_rank * readers + batch["worker"], batch["input_ids"], batch["labels"]

    def state_dict(self) -> dict:
        plan = self.plan
        return {"version": STATE_VERSION, "dp_rank": plan.dp_rank, "dp_size": plan.dp_size,
                "num_workers": plan.num_workers, "seed": plan.spec.seed, "corpora": [c.content() for c in plan.corpora],
                "workers": {str(k): v for k, v in self._states.items()}, "next_worker": self._next_worker,
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        plan = self.plan
        _check_state(state)
        if state.get("version") not in (1, STATE_VERSION):
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}; this checkpoint "
                            f"was written by another gptscale version")
        # Version 1 named the shards by path.
        content = [list(c.urls) if state["version"] == 1 else c.content() for c in plan.corpora]
        if state["corpora"] != content or state["seed"] != plan.spec.seed:
            raise DataError("loader state was saved for other corpora or another seed (shards compared by content); "
                            "resume with the same data (or start the data stream afresh)")
        self.batches = state["batches"]
        if (state["dp_size"], state["num_workers"]) == (plan.dp_size, plan.num_workers):
            self._states = {int(k): v for k, v in state["workers"].items()}
            self._next_worker = state["next_worker"]
            return
        # Another layout deals shards differently: per-worker positions do not transfer. Keep the
        # seed and restart the oldest epoch any old worker was still in (documented in the README).
        epochs = [min(p["epoch"] for p in w["positions"]) for w in state["workers"].values()] or [0]
        restart = WorkerState(0, [Position(epoch=min(epochs)) for _ in plan.corpora]).to_dict()
        self._states = {w: restart for w in range(max(1, plan.num_workers))}
        self._next_worker = 0
