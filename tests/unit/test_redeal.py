"""Re-dealing the data to another DP size or worker count: every document of the epoch in
progress is read exactly once across the change, later epochs follow the new deal, the
same layout resumes exactly, and damaged states are one error naming what is wrong.

Every token id of these corpora occurs once (document i holds a run of fresh ids), so a
label names its document and place: "read exactly once" is counted token by token."""
import collections
import copy
import itertools
import json

import numpy as np
import pytest
import torch

from gptscale.data.shards import ShardWriter
from gptscale.data.stream import (STATE_VERSION, Corpus, CorpusStream, StreamingLoader, StreamSpec, WorkerState,
                                  pack_windows, redeal, states_by_dp_rank)
from gptscale.errors import DataError
from tests.unit.data_helpers import EOS, PAD

SHARDS, DOCS_PER_SHARD = 12, 8


def unique_corpus(folder, prefix: str, first_id: int, seed: int) -> tuple[Corpus, list[tuple[int, ...]]]:
    """SHARDS shards of documents of 1..60 consecutive, never repeated token ids from `first_id` on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, prefix, max_bytes=1 << 30, dtype=np.dtype(np.uint16))
    docs, next_id = [], first_id
    for _ in range(SHARDS):
        for _ in range(DOCS_PER_SHARD):
            length = int(rng.integers(1, 61))
            docs.append(tuple(range(next_id, next_id + length)))
            writer.add(np.arange(next_id, next_id + length), {"source": "synthetic"})
            next_id += length
        writer._close_shard()  # one shard per round
    return Corpus(tuple(str(folder / s.name) for s in writer.shards)), docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return unique_corpus(tmp_path_factory.mktemp("redeal"), "u", 2, seed=0)


VOCAB = 30_000


def spec(**overrides) -> StreamSpec:
    return StreamSpec(**{**dict(seq_len=16, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, seed=4, shuffle_shards=2,
                                epochs=1), **overrides})


def loaders(corpora, dp_size, workers, **spec_overrides):
    return [StreamingLoader(corpora, spec(**spec_overrides), micro_batch=2, dp_rank=r, dp_size=dp_size,
                            num_workers=workers) for r in range(dp_size)]


def take(loader, batches: int | None) -> list:
    """The first `batches` tagged batches of a loader (all when None); its state is then theirs."""
    return list(itertools.islice(loader.iter_tagged(), batches))


def tally(segments: list[list]) -> tuple[collections.Counter, list[int]]:
    """Labels over all batches, and the first input of every reader's stream in every segment
    (a run of loaders between two changes); consecutive windows of a stream overlap by one."""
    labels, starts = collections.Counter(), []
    for batches in segments:
        last: dict[int, int] = {}
        for reader, inputs, targets in batches:
            for x, y in zip(inputs.tolist(), targets.tolist()):
                if reader in last:
                    assert x[0] == last[reader], "consecutive windows of a reader overlap by one token"
                else:
                    starts.append(x[0])
                real = [t for t in y if t != -100]
                labels.update(real)
                last[reader] = real[-1]
    return labels, starts


def assert_each_token_once(labels: collections.Counter, starts: list[int], docs, epochs: int = 1) -> None:
    """Every token of every document (and its EOS) is a label once per epoch, but where it is the
    first token of a stream, which has no token before it (as in any run's first window)."""
    tokens = [t for d in docs for t in d]
    assert labels[EOS] == epochs * len(docs)
    assert set(labels) <= set(tokens) | {EOS}, "labels that are no document's tokens"
    twice = [d for d in docs if any(labels[t] > epochs for t in d)]
    assert not twice, f"{len(twice)} documents read twice"
    first = collections.Counter(starts)
    missing = {t: epochs - labels[t] for t in tokens if labels[t] < epochs}
    assert all(first[t] >= n for t, n in missing.items()), "tokens never read"


def change(corpus_, old: tuple[int, int], new: tuple[int, int], stops: list[int], legacy: bool = False,
           **spec_overrides) -> list[list]:
    """Loaders of layout `old` (dp_size, num_workers) hand out `stops[r]` batches on rank r; the
    states are re-dealt to layout `new` and its loaders read to the end. Returns the segments."""
    first = loaders([corpus_], *old, **spec_overrides)
    before = [batch for loader, stop in zip(first, stops) for batch in take(loader, stop)]
    states = [loader.state_dict() for loader in first]
    if legacy:
        states = [as_version_2(s) for s in states]
    json.dumps(states)  # plain JSON, as a checkpoint stores it
    after = []
    for loader in loaders([corpus_], *new, **spec_overrides):
        loader.load_state_dicts(states)
        after += take(loader, None)
    return [before, after]


def as_version_2(state: dict) -> dict:
    """What gptscale wrote before the re-deal (nothing pending, no flags)."""
    state = copy.deepcopy(state)
    del state["shuffle_shards"]
    state["version"] = 2
    for worker in state["workers"].values():
        assert not any(worker.pop("pending"))
        del worker["fresh"]
    return state


@pytest.mark.parametrize("old, new, stops, legacy", [
    ((2, 1), (1, 0), [7, 4], False),
    ((2, 2), (3, 1), [5, 9], False),
    ((2, 0), (4, 2), [3, 0], True),  # rank 1 handed out nothing; states of the version before
    ((2, 1), (2, 2), [6, 6], False),  # the worker count alone
])
def test_a_redeal_reads_the_rest_of_the_epoch_exactly_once(corpus, old, new, stops, legacy):
    corpus_, docs = corpus
    segments = change(corpus_, old, new, stops, legacy)
    assert segments[0] and segments[1]
    assert_each_token_once(*tally(segments), docs)


def test_later_epochs_follow_the_new_deal_and_redeals_chain(corpus):
    """dp 2 -> 3 in epoch 0, -> 1 inside the re-dealt remainder; two epochs in all."""
    corpus_, docs = corpus
    first = loaders([corpus_], 2, 1, epochs=2)
    before = [b for loader, stop in zip(first, [9, 5]) for b in take(loader, stop)]
    middle_loaders = loaders([corpus_], 3, 1, epochs=2)
    middle = []
    for loader, stop in zip(middle_loaders, [4, 2, 3]):
        loader.load_state_dicts([loader_.state_dict() for loader_ in first])
        middle += take(loader, stop)
    states = [loader.state_dict() for loader in middle_loaders]
    assert any(any(w["pending"][0]) for s in states for w in s["workers"].values())  # still in the remainder
    [last] = loaders([corpus_], 1, 0, epochs=2)
    last.load_state_dicts(states)
    # The middle workers had not begun epoch 1 of their own deal: only epoch 0 is left over.
    [worker] = redeal(states, 1, 0, corpora=[corpus_], spec=spec(epochs=2))[0]["workers"].values()
    assert {item[0] for item in worker["pending"][0]} == {0} and worker["positions"][0]["epoch"] == 1
    labels, starts = tally([before, middle, take(last, None)])
    assert_each_token_once(labels, starts, docs, epochs=2)


def test_the_same_layout_resumes_exactly(corpus):
    corpus_, _ = corpus
    reference = [take(loader, None) for loader in loaders([corpus_], 2, 2)]
    first = loaders([corpus_], 2, 2)
    heads = [take(loader, stop) for loader, stop in zip(first, [5, 8])]
    states = [loader.state_dict() for loader in first]
    assert redeal(states, 2, 2, corpora=[corpus_], spec=spec()) == states
    for rank, loader in enumerate(loaders([corpus_], 2, 2)):
        loader.load_state_dicts(states)
        got = heads[rank] + take(loader, None)
        assert len(got) == len(reference[rank])
        assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
                   for a, b in zip(got, reference[rank]))


def test_a_resume_inside_the_redealt_remainder_is_exact(corpus):
    """A re-dealt state saved and resumed on the same layout continues bitwise: a leftover at
    the head of the pending list starts again with its last label as context."""
    corpus_, _ = corpus
    first = loaders([corpus_], 2, 1)
    for loader, stop in zip(first, [7, 3]):
        take(loader, stop)
    states = redeal([loader.state_dict() for loader in first], 3, 1, corpora=[corpus_], spec=spec())

    def fresh(rank):
        loader = loaders([corpus_], 3, 1)[rank]
        loader.load_state_dict(states[rank])
        return loader

    for rank in range(3):
        reference = take(fresh(rank), None)
        for stop in (1, 3, len(reference) // 2):
            interrupted = fresh(rank)
            head = take(interrupted, stop)
            resumed = loaders([corpus_], 3, 1)[rank]
            resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
            got = head + take(resumed, None)
            assert len(got) == len(reference)
            assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(got, reference))


def test_a_mixture_is_redealt_corpus_by_corpus(corpus, tmp_path):
    """A finite mixture ends with its first corpus, so each corpus' remainder is read here as the
    mixture draws it: its own packed stream per new worker, from the re-dealt state."""
    corpus_a, docs_a = corpus
    corpus_b, docs_b = unique_corpus(tmp_path / "b", "b", 20_000, seed=1)
    mix = [Corpus(corpus_a.urls, weight=2.0), Corpus(corpus_b.urls, weight=1.0)]
    first = [StreamingLoader(mix, spec(), micro_batch=2, dp_rank=r, dp_size=2, num_workers=1) for r in range(2)]
    before = [b for loader, stop in zip(first, [8, 5]) for b in take(loader, stop)]
    states = redeal([loader.state_dict() for loader in first], 3, 0, corpora=mix, spec=spec())
    of_b = lambda window: bool((window >= 20_000).any())  # noqa: E731 - EOS aside, a window is of one corpus
    streams = {}  # (new worker, corpus) -> its windows
    for index, docs in ((0, docs_a), (1, docs_b)):
        ours = [(reader, x[None], y[None]) for reader, inputs, labels in before
                for x, y in zip(inputs, labels) if of_b(x) == bool(index)]
        for w, state in enumerate(states):
            worker = WorkerState.from_dict(state["workers"]["0"])
            stream = CorpusStream(mix[index], index, w, 3, spec())
            streams[w, index] = [(torch.from_numpy(x), torch.from_numpy(y))
                                 for x, y, _, _ in pack_windows(stream, worker.positions[index], worker.pending[index])]
        after = [(w, x[None], y[None]) for w in range(3) for x, y in streams[w, index]]
        assert_each_token_once(*tally([ours, after]), docs)
    # The loader of the new layout draws from exactly those streams.
    resumed = StreamingLoader(mix, spec(), micro_batch=2, dp_rank=1, dp_size=3, num_workers=0)
    resumed.load_state_dicts([loader.state_dict() for loader in first])
    drawn = {0: [], 1: []}
    for _, inputs, labels in take(resumed, 10):
        for x, y in zip(inputs, labels):
            drawn[int(of_b(x))].append((x, y))
    assert drawn[0] and drawn[1]
    for index, windows in drawn.items():
        assert len(windows) <= len(streams[1, index])
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(windows, streams[1, index]))


# -- damaged and mismatched states ----------------------------------------------------------

def _states(corpus_):
    first = loaders([corpus_], 2, 1)
    for loader, stop in zip(first, [3, 2]):
        take(loader, stop)
    return [loader.state_dict() for loader in first]


def _set(path, value):
    def damage(state):
        *parents, last = path
        target = state
        for key in parents:
            target = target[key]
        target[last] = value
    return damage


@pytest.mark.parametrize("damage, named", [
    (_set(("version",), "3"), "version"),
    (_set(("version",), 9), "loader state version 9"),
    (_set(("dp_rank",), 5), "dp_rank"),
    (_set(("workers",), []), "workers is list, not a mapping"),
    (_set(("workers", "0", "windows"), -1), r"workers\['0'\].windows is -1"),
    (_set(("workers", "0", "positions", 0, "group"), 7), r"positions\[0\].group is 7"),
    (_set(("workers", "0", "positions", 0, "offset"), 1.5), r"positions\[0\].offset is 1.5"),
    (_set(("workers", "0", "positions"), []), "holds 0 entries, not 1"),
    (_set(("workers", "0", "fresh"), [1]), "fresh holds something"),
    (_set(("workers", "0", "pending"), [[[0, 0, 1, 0, 0, 0]]]), "not the fresh start of an epoch"),
    (_set(("workers", "7"), {}), "worker '7' is not one of the 1 loader workers"),
    (_set(("next_worker",), 2), "next_worker"),
    (_set(("shuffle_shards",), 3), "shuffle_shards=3"),
    (_set(("seed",), 5), "other corpora or another seed"),
])
def test_a_damaged_state_is_one_error_naming_it(corpus, damage, named):
    corpus_, _ = corpus
    states = _states(corpus_)
    damage(states[0])
    with pytest.raises(DataError, match=named) as err:
        loaders([corpus_], 2, 1)[0].load_state_dict(states[0])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=named):
        redeal(states, 3, 1, corpora=[corpus_], spec=spec())


@pytest.mark.parametrize("item, named", [
    ([0, 0, 1], "holds 3 entries, not 6"),
    ([1, 0, 1, 0, 0, 0], "epoch is 1, not an integer in \\[0, 1\\)"),
    ([0, 2, 2, 0, 0, 0], "worker is 2"),
    ([0, 0, SHARDS + 1, 0, 0, 0], "workers is 13"),
    ([0, 0, 4, 2, 0, 0], "group is 2"),
    ([0, 0, 4, 0, -3, 0], "doc is -3"),
    ([0, 0, 4, 0, 0, "1"], "offset is '1'"),
])
def test_a_damaged_leftover_is_one_error_naming_it(corpus, item, named):
    corpus_, _ = corpus
    states = redeal(_states(corpus_), 3, 1, corpora=[corpus_], spec=spec(epochs=2))
    worker = states[0]["workers"]["0"]
    assert worker["positions"][0]["epoch"] == 1 and worker["pending"][0]
    worker["pending"][0][0] = item
    with pytest.raises(DataError, match=named):
        loaders([corpus_], 3, 1, epochs=2)[0].load_state_dict(states[0])


def test_a_state_pointing_past_its_documents_is_one_error(corpus):
    corpus_, _ = corpus
    states = redeal(_states(corpus_), 3, 1, corpora=[corpus_], spec=spec())
    states[0]["workers"]["0"]["pending"][0][0][4] = 10_000  # document 10000 of a group of 16
    loader = loaders([corpus_], 3, 1)[0]
    loader.load_state_dict(states[0])
    with pytest.raises(DataError, match="points at token .* of document 10000 of a shuffle group of 16 documents"):
        take(loader, None)


def test_redeal_needs_every_rank_in_order(corpus):
    corpus_, _ = corpus
    states = _states(corpus_)
    for given in ([], states[:1], states[::-1], [states[0], states[0]]):
        with pytest.raises(DataError, match="every DP rank|one loader state per DP rank"):
            redeal(given, 3, 1, corpora=[corpus_], spec=spec())
    other = loaders([corpus_], 3, 1)[2].state_dict()
    with pytest.raises(DataError, match="one loader state per DP rank"):
        redeal(states + [other], 1, 0, corpora=[corpus_], spec=spec())
    with pytest.raises(DataError, match="has 12 shards but 13 readers"):
        redeal(states, 13, 1)
    assert STATE_VERSION == 3 and all(s["version"] == 3 for s in redeal(states, 3, 1, corpora=[corpus_], spec=spec()))


def test_the_trainer_call_needs_only_the_states(corpus):
    """redeal(states, dp_size, num_workers): shards, seed and shuffle_shards come from the states,
    the stream is endless; what the loaders check later, corpora= and spec= check now."""
    corpus_, _ = corpus
    first = loaders([corpus_], 2, 1, epochs=None)
    for loader, stop in zip(first, [30, 55]):  # into epoch 1 on one rank
        take(loader, stop)
    states = [loader.state_dict() for loader in first]
    alone = redeal(states, 3, 2)
    assert alone == redeal(states, 3, 2, corpora=[corpus_], spec=spec(epochs=None))
    assert {item[0] for s in alone for w in s["workers"].values() for item in w["pending"][0]} == {0, 1}
    resumed = loaders([corpus_], 3, 2, epochs=None)[2]
    resumed.load_state_dict(alone[2])
    assert len(take(resumed, 40)) == 40
    with pytest.raises(DataError, match="does not record shuffle_shards"):
        redeal([as_version_2(s) for s in _states(corpus_)], 3, 1)
    with pytest.raises(DataError, match="different data"):
        redeal([states[0], loaders([corpus_], 2, 1, epochs=None, seed=9)[1].state_dict()], 3, 1)


def test_states_of_every_global_rank_give_one_per_dp_rank(corpus):
    corpus_, _ = corpus
    states = _states(corpus_)
    # TP peers (global ranks 0, 1 on DP rank 0; 2, 3 on DP rank 1), in any order.
    assert states_by_dp_rank([states[1], states[0], copy.deepcopy(states[1]), states[0]]) == states
    other = copy.deepcopy(states[0])
    other["batches"] += 1
    with pytest.raises(DataError, match="two ranks of DP rank 0 saved different loader states"):
        states_by_dp_rank([states[0], other, states[1]])
    with pytest.raises(DataError, match="dp_rank is None"):
        states_by_dp_rank([{}])
