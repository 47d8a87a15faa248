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
5. Re-deal. A run resumed with another DP size or worker count cannot keep per-worker
   positions: the deal differs. `redeal` takes the states of all old DP ranks and hands
   what the old workers left unread of each corpus, up to the end of the latest epoch any
   of them began (the rest of partly read groups, from the next unlabelled token of a
   partly packed document, and the untouched groups), round-robin to the new workers as
   a `pending` list of `Leftover`s; a worker reads its pending list first, then the normal
   deal of the next epoch for the new worker count. Each corpus is re-dealt on its own;
   the mixture draws restart at window 0 of each new worker.

The state after each window is (windows emitted, and per corpus the position of the next
window's first token: epoch, group, document, offset; the pending list; whether the normal
deal has begun). Each batch carries its worker's state to the main process, which remembers
the state of the last batch it handed to the training loop; DataLoader's round-robin over
workers is restored by rotating logical worker ids. Resuming replays at most one shuffle
group per worker (to rebuild its order).

Shards are read by `data/read.py`, which trusts nothing in them. Token ids keep their stored
width until windows are cut. The resume state names shards by content (sha256), so a folder
may move. A state read from a checkpoint is JSON that anyone may have written: its shape and
every number's range are checked before it is used.
"""
from __future__ import annotations

import copy
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
STATE_VERSION = 3  # 3: per worker `pending` and `fresh`, and the state's `shuffle_shards`
COUNT_LIMIT = 1 << 40  # no epoch, group, document, offset or window count of a real run comes near
MAX_PENDING = 1 << 20  # leftovers of one corpus in one state (~30 MB of JSON)
MAX_DP, MAX_WORKERS = 1 << 20, 4096


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
    `group` of epoch `epoch` (in this worker's order). Once a window has been emitted, that
    token has been the last label of the window before."""

    epoch: int = 0
    group: int = 0
    doc: int = 0
    offset: int = 0

    def at(self, token: int) -> "Position":
        """This document's mark for a next window that starts at `token`."""
        return replace(self, offset=token)


@dataclass(frozen=True)
class Leftover:
    """What a worker of an earlier deal left unread of one shuffle group: documents `doc`.. of
    group `group` of global worker `worker` of `workers` in epoch `epoch` (in that worker's
    order), the first from token `offset` on. Tokens before `offset` have been labels, so the
    offset is one past a Position's; a worker that starts its stream on a leftover reads token
    `offset - 1` again, as context only, which is how an uninterrupted stream continues."""

    epoch: int
    worker: int
    workers: int
    group: int
    doc: int = 0
    offset: int = 0

    def at(self, token: int) -> "Leftover":
        """This document's mark for a next window that starts at `token` (a label already)."""
        return replace(self, offset=token + 1)

    def to_list(self) -> list[int]:
        return [self.epoch, self.worker, self.workers, self.group, self.doc, self.offset]


@dataclass(frozen=True)
class StreamSpec:
    seq_len: int
    vocab_size: int
    eos_id: int
    pad_id: int
    seed: int = 0
    shuffle_shards: int = 2  # shards per shuffle group; 0 = no shuffling at all
    epochs: int | None = None  # None: forever


def group_count(shards: int, worker: int, workers: int, shuffle_shards: int) -> int:
    """How many shuffle groups global worker `worker` of `workers` reads in every epoch."""
    return -(-len(range(worker, shards, workers)) // max(1, shuffle_shards))


class CorpusStream:
    """The documents one global worker reads from one corpus: its pending leftovers, then its
    own deal from any Position on."""

    def __init__(self, corpus: Corpus, corpus_index: int, worker: int, workers: int, spec: StreamSpec):
        if len(corpus.urls) < workers:
            raise DataError(f"corpus {corpus.name or corpus.urls[0]!r} has {len(corpus.urls)} shards but "
                            f"{workers} readers (dp ranks x loader workers) each need at least one; re-run "
                            f"prepare with a smaller --shard-size or use fewer loader workers")
        self.corpus, self.index, self.worker, self.workers, self.spec = corpus, corpus_index, worker, workers, spec
        self._deal: tuple[tuple[int, int, int], list[list[str]]] | None = None  # the last deal made

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.index, *keys])

    def groups(self, epoch: int, worker: int | None = None, workers: int | None = None) -> list[list[str]]:
        """The shard groups of `worker` of `workers` (this stream's by default) in `epoch`."""
        key = (epoch, self.worker, self.workers) if worker is None else (epoch, worker, workers)
        if self._deal is None or self._deal[0] != key:  # one permutation of all shards per epoch, not per group
            urls = self.corpus.urls
            order = self._rng(epoch).permutation(len(urls)) if self.spec.shuffle_shards else np.arange(len(urls))
            mine = [urls[i] for i in order[key[1]::key[2]]]
            size = max(1, self.spec.shuffle_shards)
            self._deal = key, [mine[i:i + size] for i in range(0, len(mine), size)]
        return self._deal[1]

    def group_documents(self, epoch: int, worker: int, workers: int, group: int) -> list[np.ndarray]:
        """The documents of one group, in the order its worker emits them."""
        urls = self.groups(epoch, worker, workers)[group]
        docs = [doc for url in urls for doc in read_shard(url, self.spec.vocab_size, self.corpus.expected(url))]
        if not self.spec.shuffle_shards:
            return docs
        return [docs[i] for i in self._rng(epoch, worker, group).permutation(len(docs))]

    def documents(self, start: Position, pending: tuple[Leftover, ...] = ()
                  ) -> Iterator[tuple[int, Position | Leftover, np.ndarray, int]]:
        """(pending items finished, the document's mark, its tokens, its first token to read) for
        every document from the pending leftovers on, then from `start` on."""
        for k, item in enumerate(pending):
            docs = self.group_documents(item.epoch, item.worker, item.workers, item.group)
            _check_start(docs, item.doc, item.offset, 1, item)
            for d in range(item.doc, len(docs)):
                first = 0 if d != item.doc else max(item.offset - 1, 0) if k == 0 else item.offset
                yield k, replace(item, doc=d, offset=0), docs[d], first
        epoch = start.epoch
        while self.spec.epochs is None or epoch < self.spec.epochs:
            for g in range(start.group if epoch == start.epoch else 0, len(self.groups(epoch))):
                docs = self.group_documents(epoch, self.worker, self.workers, g)
                here = (epoch, g) == (start.epoch, start.group)
                if here:
                    _check_start(docs, start.doc, start.offset, 0, start)
                for d in range(start.doc if here else 0, len(docs)):
                    first = start.offset if here and d == start.doc else 0
                    yield len(pending), Position(epoch, g, d, 0), docs[d], first
            epoch += 1


def _check_start(docs: list[np.ndarray], doc: int, offset: int, past_eos: int, mark) -> None:
    """A resume state's document and offset lie inside the group (a leftover may point one
    past the EOS: its document is all read); else the state is not of these shards."""
    if (doc, offset) == (0, 0) and not docs:
        return
    if doc >= len(docs) or offset > len(docs[doc]) + past_eos:
        raise DataError(f"the data loader state points at token {offset} of document {doc} of a shuffle group of "
                        f"{len(docs)} documents ({mark}); it was saved for other shards or is damaged")


def pack_windows(stream: CorpusStream, start: Position, pending: tuple[Leftover, ...] = ()
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, int, Position | Leftover]]:
    """(input_ids, labels, pending items finished, mark of the next window's start) for
    consecutive packed windows."""
    spec = stream.spec
    length = spec.seq_len
    buffer = np.empty(0, dtype=np.int64)
    # Where each document's tokens begin in `buffer`:
    # [pending items done, its mark, offset in the doc of its first buffered token, index]
    segments: list[list] = []
    for k, mark, doc, first in stream.documents(start, pending):
        tokens = np.append(doc, spec.eos_id)
        segments.append([k, mark, first, len(buffer)])
        buffer = np.concatenate([buffer, tokens[first:]])
        while len(buffer) >= length + 1:
            window = buffer[:length + 1]
            buffer = buffer[length:]  # the last token of this window starts the next one
            for seg in segments:
                seg[3] -= length
            while len(segments) > 1 and segments[1][3] <= 0:
                segments.pop(0)
            head = segments[0]
            if head[3] < 0:  # the next window starts inside this document
                head[2], head[3] = head[2] - head[3], 0
            yield window[:-1].copy(), window[1:].copy(), head[0], head[1].at(head[2])
    if len(buffer) >= 2:  # finite stream: the tail, padded
        inputs = np.full(length, spec.pad_id, dtype=np.int64)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        inputs[:len(buffer) - 1], labels[:len(buffer) - 1] = buffer[:-1], buffer[1:]
        yield inputs, labels, len(pending), Position(epoch=spec.epochs or 0)


# -- mixing corpora, batching per worker ---------------------------------------------------

@dataclass
class WorkerState:
    """Per corpus: `positions`, where the worker's own deal continues; `pending`, the leftovers
    it reads first (the head's doc and offset say where the next window starts); `fresh`,
    whether no window has ended inside its own deal yet (then the token at its position has
    not been a label: a re-deal must hand it out whole)."""

    windows: int = 0
    positions: list[Position] = field(default_factory=list)
    pending: list[tuple[Leftover, ...]] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, corpora: int) -> "WorkerState":
        return cls(0, [Position()] * corpora, [()] * corpora, [True] * corpora)

    def to_dict(self) -> dict:
        return {"windows": self.windows, "positions": [asdict(p) for p in self.positions],
                "pending": [[item.to_list() for item in p] for p in self.pending], "fresh": list(self.fresh)}

    @classmethod
    def from_dict(cls, data: dict) -> "WorkerState":
        """A state checked by _check_state; versions 1 and 2 had no re-deal: nothing pending, and
        a corpus is fresh while it is at the very start."""
        positions = [Position(**p) for p in data["positions"]]
        if "pending" not in data:
            fresh = [data["windows"] == 0 or p == Position() for p in positions]
            return cls(data["windows"], positions, [()] * len(positions), fresh)
        return cls(data["windows"], positions, [tuple(Leftover(*item) for item in p) for p in data["pending"]],
                   list(data["fresh"]))


def mixed_windows(corpora: list[Corpus], spec: StreamSpec, worker: int, workers: int,
                  state: WorkerState) -> Iterator[tuple[np.ndarray, np.ndarray, WorkerState]]:
    """Windows of all corpora, interleaved by weight; ends when any finite corpus ends."""
    if not state.positions:
        state = replace(WorkerState.start(len(corpora)), windows=state.windows)
    positions, pending, fresh = list(state.positions), list(state.pending), list(state.fresh)
    sources = [pack_windows(CorpusStream(c, i, worker, workers, spec), positions[i], pending[i])
               for i, c in enumerate(corpora)]
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
            inputs, labels, done, mark = next(sources[choice])
        except StopIteration:
            return
        if isinstance(mark, Leftover):
            pending[choice] = (mark, *state.pending[choice][done + 1:])
        else:
            positions[choice], pending[choice], fresh[choice] = mark, (), False
        n += 1
        yield inputs, labels, WorkerState(n, list(positions), list(pending), list(fresh))


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
    load_state_dict() continues with the very next batch of the uninterrupted run. A run with
    another DP size or worker count resumes with load_state_dicts(every DP rank's state).
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
                "num_workers": plan.num_workers, "seed": plan.spec.seed, "shuffle_shards": plan.spec.shuffle_shards,
                "corpora": [c.content() for c in plan.corpora], "workers": {str(k): v for k, v in self._states.items()},
                "next_worker": self._next_worker, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` (this DP rank's state_dict(), perhaps of an older version, or
        redeal()'s entry for this rank) left off. A state of another layout, given alone, cannot
        be re-dealt (that needs every rank's: load_state_dicts): the oldest epoch any of its
        workers was in starts again, so nothing is skipped, but documents are seen twice."""
        plan = self.plan
        _check_state(state, plan.spec.shuffle_shards)
        _check_same_data(state, list(plan.corpora), plan.spec)
        self.batches = state["batches"]
        if (state["dp_size"], state["num_workers"]) == (plan.dp_size, plan.num_workers):
            if state["dp_rank"] != plan.dp_rank:
                raise DataError(f"the loader state of DP rank {state['dp_rank']} was given to DP rank {plan.dp_rank}; "
                                f"each rank resumes from its own")
            self._states = {int(k): WorkerState.from_dict(v).to_dict() for k, v in state["workers"].items()}
            self._next_worker = state["next_worker"]
            return
        workers = _worker_states(state, len(plan.corpora))
        oldest = min(e for w in workers for e in (*(p.epoch for p in w.positions),
                                                   *(item.epoch for p in w.pending for item in p)))
        restart = replace(WorkerState.start(len(plan.corpora)), positions=[Position(epoch=oldest)] * len(plan.corpora))
        self._states = {w: restart.to_dict() for w in range(max(1, plan.num_workers))}
        self._next_worker = 0

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the states of every DP rank of a run (in DP-rank order), whatever its DP
        size and worker count: see redeal."""
        plan = self.plan
        mine = redeal(states, plan.dp_size, plan.num_workers, corpora=list(plan.corpora), spec=plan.spec)[plan.dp_rank]
        self.load_state_dict(mine)


# -- loader states from checkpoints: checked, and re-dealt to another layout ----------------

def _damaged(what: str) -> DataError:
    return DataError(f"the data loader state in the checkpoint is damaged or not gptscale's ({what}); resume from "
                     f"another checkpoint")


def _count(value, what: str, limit: int = COUNT_LIMIT, low: int = 0) -> int:
    if type(value) is not int or not low <= value < limit:
        raise _damaged(f"{what} is {value!r:.40}, not an integer in [{low}, {limit})")
    return value


def _list(value, what: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise _damaged(f"{what} is a {type(value).__name__}, not a list")
    if length is not None and len(value) != length:
        raise _damaged(f"{what} holds {len(value)} entries, not {length}")
    return value


def _check_state(state, shuffle_shards: int | None) -> None:
    """A loader state read from a checkpoint (JSON, perhaps an attacker's) has the shape and
    ranges state_dict() gives, or this raises one DataError naming the first thing wrong. Its
    groups are counted with its own shuffle_shards (recorded since version 3), else the run's."""
    if not isinstance(state, dict):
        raise _damaged(f"it is a {type(state).__name__}, not a mapping")
    version = _count(state.get("version"), "version")
    if version not in (1, 2, STATE_VERSION):
        raise DataError(f"loader state version {version} is not {STATE_VERSION}; this checkpoint was written by "
                        f"another gptscale version")
    expected = {"version", "dp_rank", "dp_size", "num_workers", "seed", "corpora", "workers", "next_worker", "batches"}
    if set(state) != expected | ({"shuffle_shards"} if version >= 3 else set()):
        raise _damaged(f"its keys are {sorted(state)!r:.200}")
    _count(state["seed"], "seed", 1 << 64)
    _count(state["batches"], "batches")
    dp_size = _count(state["dp_size"], "dp_size", MAX_DP, low=1)
    readers = max(1, _count(state["num_workers"], "num_workers", MAX_WORKERS))
    dp_rank = _count(state["dp_rank"], "dp_rank", dp_size)
    _count(state["next_worker"], "next_worker", readers)
    if version >= 3:
        shuffle_shards = _count(state["shuffle_shards"], "shuffle_shards")
    elif shuffle_shards is None:
        raise DataError(f"the loader state (version {version}) does not record shuffle_shards; re-deal it with "
                        f"spec= the run's StreamSpec")
    shards = [len(_list(c, f"corpora[{i}]")) for i, c in enumerate(_list(state["corpora"], "corpora"))]
    if not all(isinstance(url, str) for c in state["corpora"] for url in c):
        raise _damaged("a shard name in corpora is not a string")
    workers = state["workers"]
    if not isinstance(workers, dict):
        raise _damaged(f"workers is {type(workers).__name__}, not a mapping")
    pending = [0] * len(shards)
    for key, worker in workers.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and key == str(int(key))
                and int(key) < readers):
            raise _damaged(f"worker {key!r:.40} is not one of the {readers} loader workers")
        layout = (dp_rank * readers + int(key), dp_size * readers, shuffle_shards)
        _check_worker(worker, f"workers[{key!r}]", version, shards, layout)
        for c, items in enumerate(worker.get("pending", ())):
            pending[c] += len(items)
    if max(pending, default=0) > MAX_PENDING:
        raise _damaged(f"{max(pending):,} pending leftovers of one corpus, more than {MAX_PENDING:,}")


def _check_worker(worker, what: str, version: int, shards: list[int], layout: tuple[int, int, int]) -> None:
    """One worker's state: positions inside its deal; leftovers inside theirs, older than its
    position, which is at the start of an epoch while anything is pending."""
    keys = {"windows", "positions"} | ({"pending", "fresh"} if version >= 3 else set())
    if not isinstance(worker, dict) or set(worker) != keys:
        raise _damaged(f"{what} is not a mapping with keys {sorted(keys)}")
    _count(worker["windows"], f"{what}.windows")
    reader, readers, shuffle = layout
    positions = _list(worker["positions"], f"{what}.positions", len(shards))
    for c, p in enumerate(positions):
        where = f"{what}.positions[{c}]"
        if not isinstance(p, dict) or set(p) != {"epoch", "group", "doc", "offset"}:
            raise _damaged(f"{where} is not a mapping with keys epoch, group, doc, offset")
        for name in ("epoch", "doc", "offset"):
            _count(p[name], f"{where}.{name}")
        _count(p["group"], f"{where}.group", max(1, group_count(shards[c], reader, readers, shuffle)))
    if version < 3:
        return
    fresh = _list(worker["fresh"], f"{what}.fresh", len(shards))
    if not all(type(f) is bool for f in fresh):
        raise _damaged(f"{what}.fresh holds something other than true or false")
    for c, items in enumerate(_list(worker["pending"], f"{what}.pending", len(shards))):
        if len(_list(items, f"{what}.pending[{c}]")) > MAX_PENDING:
            raise _damaged(f"{what}.pending[{c}] holds {len(items):,} leftovers, more than {MAX_PENDING:,}")
        if items and (positions[c]["group"], positions[c]["doc"], positions[c]["offset"], fresh[c]) != (0, 0, 0, True):
            raise _damaged(f"{what} has leftovers of corpus {c} but its position is not the fresh start of an epoch")
        for i, item in enumerate(items):
            _check_leftover(item, f"{what}.pending[{c}][{i}]", shards[c], positions[c]["epoch"], shuffle)


def _check_leftover(item, what: str, shards: int, before_epoch: int, shuffle: int) -> None:
    epoch, worker, workers, group, doc, offset = _list(item, what, 6)
    _count(epoch, f"{what} epoch", before_epoch)
    _count(workers, f"{what} workers", shards + 1, low=1)
    _count(worker, f"{what} worker", workers)
    _count(group, f"{what} group", group_count(shards, worker, workers, shuffle))
    _count(doc, f"{what} doc")
    _count(offset, f"{what} offset")


def _check_same_data(state: dict, corpora: list[Corpus] | None, spec: StreamSpec | None) -> None:
    """The state is of these corpora (where given) and this seed and shuffle_shards (where given)."""
    # Version 1 named the shards by path.
    content = None if corpora is None else [list(c.urls) if state["version"] == 1 else c.content() for c in corpora]
    if (content is not None and state["corpora"] != content) or (spec is not None and state["seed"] != spec.seed):
        raise DataError("loader state was saved for other corpora or another seed (shards compared by content); "
                        "resume with the same data (or start the data stream afresh)")
    if spec is not None and state.get("shuffle_shards", spec.shuffle_shards) != spec.shuffle_shards:
        raise DataError(f"loader state was saved with shuffle_shards={state['shuffle_shards']}, this run has "
                        f"{spec.shuffle_shards}: its positions name other shuffle groups; resume with "
                        f"shuffle_shards={state['shuffle_shards']} (or start the data stream afresh)")


def _worker_states(state: dict, corpora: int) -> list[WorkerState]:
    """Every loader worker of a checked state, in logical order (a worker that had handed out
    nothing is at its start)."""
    workers = state["workers"]
    return [WorkerState.from_dict(workers[str(k)]) if str(k) in workers else WorkerState.start(corpora)
            for k in range(max(1, state["num_workers"]))]


def redeal(states: list[dict], dp_size: int, num_workers: int, *, corpora: list[Corpus] | None = None,
           spec: StreamSpec | None = None) -> list[dict]:
    """The loader states of every DP rank of a run (each what state_dict() gave on that rank, in
    DP-rank order) -> one state per DP rank of a run with `dp_size` ranks of `num_workers`
    loader workers, for load_state_dict. With the same layout the states come back as they are
    (an exact resume). Else the new workers finish, between them, what the old ones left of
    every epoch any of them began, each document (each unlabelled token) exactly once, and then
    go on with the normal deal of the next epoch for their own number. Pure: every rank can
    compute it and keep its own entry.

    The states say which shards, seed and shuffle_shards they are of; `corpora` and `spec` (the
    new run's), where given, are checked against them here (load_state_dict checks them in any
    case). Without `spec` the stream is endless (as training's is), and states written before
    version 3, which do not record shuffle_shards, cannot be re-dealt; version 1 ones (shards
    named by path) need `corpora`."""
    if type(dp_size) is not int or type(num_workers) is not int or dp_size < 1 or num_workers < 0:
        raise DataError(f"cannot re-deal the data to dp_size={dp_size!r}, num_workers={num_workers!r}")
    _check_layout_states(states, corpora, spec)
    if (states[0]["dp_size"], states[0]["num_workers"]) == (dp_size, num_workers):
        return copy.deepcopy(states)
    first = states[0]
    if first["version"] == 1 and corpora is None:
        raise DataError("a loader state of version 1 names its shards by path: re-deal it with corpora=")
    content = [c.content() for c in corpora] if corpora is not None else first["corpora"]
    shuffle = first.get("shuffle_shards", None if spec is None else spec.shuffle_shards)
    epochs = spec.epochs if spec is not None else None
    readers = max(1, num_workers)
    new = [WorkerState(0, [], [], []) for _ in range(dp_size * readers)]
    old = [w for state in states for w in _worker_states(state, len(content))]
    for index, shards in enumerate(len(c) for c in content):
        if shards < len(new):
            raise DataError(f"corpus {index} has {shards} shards but {len(new)} readers (dp ranks x loader workers) "
                            f"each need at least one; re-run prepare with a smaller --shard-size or use fewer loader "
                            f"workers")
        items, start = _leftovers(old, index, shards, shuffle, epochs)
        for w, worker in enumerate(new):
            worker.positions.append(start)
            worker.pending.append(tuple(items[w::len(new)]))
            worker.fresh.append(True)
    batches = sum(s["batches"] for s in states) // dp_size
    return [{"version": STATE_VERSION, "dp_rank": r, "dp_size": dp_size, "num_workers": num_workers,
             "seed": first["seed"], "shuffle_shards": shuffle, "corpora": copy.deepcopy(content),
             "workers": {str(k): new[r * readers + k].to_dict() for k in range(readers)}, "next_worker": 0,
             "batches": batches} for r in range(dp_size)]


def states_by_dp_rank(states: list[dict]) -> list[dict]:
    """The loader states of every global rank of a run -> one per DP rank, in DP-rank order, as
    redeal takes them. The TP and PP peers of a DP rank read the same stream in lockstep, so
    they hold the same state; peers that differ are an error (a damaged checkpoint)."""
    ranks: dict[int, dict] = {}
    for state in states if isinstance(states, list) else [None]:
        rank = state.get("dp_rank") if isinstance(state, dict) else None
        if type(rank) is not int or rank < 0:
            raise _damaged(f"dp_rank is {rank!r:.40}, not an integer >= 0")
        if ranks.setdefault(rank, state) != state:
            raise _damaged(f"two ranks of DP rank {rank} saved different loader states")
    return [ranks[r] for r in sorted(ranks)]


def _check_layout_states(states, corpora: list[Corpus] | None, spec: StreamSpec | None) -> None:
    """One checked state of the same data per DP rank of one layout, in DP-rank order."""
    if not isinstance(states, list) or not states:
        raise DataError("re-dealing the data needs the loader states of every DP rank of the saved run; got none")
    for state in states:
        _check_state(state, None if spec is None else spec.shuffle_shards)
        _check_same_data(state, corpora, spec)
    data = [(s["version"], s["corpora"], s["seed"], s.get("shuffle_shards")) for s in states]
    if any(d != data[0] for d in data):
        raise DataError("the DP ranks' loader states are of different data, seeds or versions; they are not of one "
                        "checkpoint")
    layouts = {(s["dp_size"], s["num_workers"]) for s in states}
    ranks = [s["dp_rank"] for s in states]
    if len(layouts) != 1 or ranks != list(range(states[0]["dp_size"])):
        raise DataError(f"re-dealing the data needs one loader state per DP rank of the saved run, in DP-rank order; "
                        f"got DP ranks {ranks} of layouts (dp_size, num_workers) {sorted(layouts)}")


def _leftovers(old: list[WorkerState], index: int, shards: int, shuffle: int, epochs: int | None
               ) -> tuple[list[Leftover], Position]:
    """What the old workers (global order) left of corpus `index`, up to the end of the latest
    epoch any of them began, oldest epoch first; and where the new workers' own deal starts."""
    last = max(_epoch_in(w, index) for w in old)
    if epochs is not None:
        last = min(last, epochs - 1)
    last = max([last] + [item.epoch for w in old for item in w.pending[index]])  # the new deal comes after them
    groups = [group_count(shards, w, len(old), shuffle) for w in range(len(old))]
    count = sum(len(w.pending[index]) + max(0, (last - w.positions[index].epoch + 1) * groups[i]
                                            - w.positions[index].group) for i, w in enumerate(old))
    if count > MAX_PENDING:
        raise DataError(f"re-dealing corpus {index} would hand out {count:,} leftover shuffle groups (its old workers "
                        f"are many epochs apart), more than {MAX_PENDING:,}; resume with the old layout")
    items = [item for w, state in enumerate(old) for item in
             (*state.pending[index], *_rest_of_deal(state, index, w, len(old), groups[w], last))]
    items.sort(key=lambda item: item.epoch)  # stable: within an epoch, old worker by old worker
    return items, Position(epoch=last + 1)


def _epoch_in(worker: WorkerState, index: int) -> int:
    """The latest epoch the worker began in its own deal of corpus `index` (-1: none yet)."""
    p = worker.positions[index]
    untouched = worker.fresh[index] and (p.group, p.doc, p.offset) == (0, 0, 0)
    return p.epoch - 1 if untouched else p.epoch


def _rest_of_deal(worker: WorkerState, index: int, w: int, workers: int, groups: int, last: int
                  ) -> Iterator[Leftover]:
    """Global worker `w`'s own deal of corpus `index` from its position to the end of epoch
    `last`: its partly read group from the next unlabelled token, then whole groups."""
    p = worker.positions[index]
    for epoch in range(p.epoch, last + 1):
        for g in range(p.group if epoch == p.epoch else 0, groups):
            if (epoch, g) == (p.epoch, p.group):
                yield Leftover(epoch, w, workers, g, p.doc, p.offset + (0 if worker.fresh[index] else 1))
            else:
                yield Leftover(epoch, w, workers, g)
