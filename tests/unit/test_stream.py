"""Streaming loader: exactly-once epochs, lossless packing, exact resume, mixtures, bad shards."""
import collections
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
import webdataset

from gptscale.errors import DataError
from gptscale.data.shards import npy_bytes
from gptscale.data.read import read_shard
from gptscale.data.stream import Corpus, StreamingLoader, StreamSpec
from tests.unit.data_helpers import EOS, PAD, split_documents, streams_by_reader, write_shards

VOCAB = 1000


def spec(**overrides):
    return StreamSpec(**{**dict(seq_len=32, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, seed=0,
                                shuffle_shards=2, epochs=1), **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    urls, docs = write_shards(tmp_path_factory.mktemp("corpus"), "train", shards=8, docs_per_shard=25)
    return Corpus(tuple(urls)), docs


def loaders(corpus_, dp_size=2, workers=2, micro_batch=4, **spec_overrides):
    return [StreamingLoader([corpus_], spec(**spec_overrides), micro_batch=micro_batch, dp_rank=r,
                            dp_size=dp_size, num_workers=workers) for r in range(dp_size)]


def test_every_document_exactly_once_across_ranks_and_workers(corpus):
    corpus_, docs = corpus
    tagged = [b for loader in loaders(corpus_) for b in loader.iter_tagged()]
    streams = streams_by_reader(tagged)
    assert sorted(streams) == [0, 1, 2, 3]  # 2 ranks x 2 workers all read
    seen = collections.Counter(d for s in streams.values() for d in split_documents(s))
    assert seen == collections.Counter(docs)


def test_packing_is_lossless_and_windows_cross_documents(corpus):
    corpus_, docs = corpus
    [loader] = loaders(corpus_, dp_size=1, workers=0, shuffle_shards=0)
    batches = list(loader.iter_tagged())
    stream = streams_by_reader(batches)[0]
    assert stream == [t for d in docs for t in (*d, EOS)]  # file order, nothing lost or added
    inputs = torch.cat([b[1] for b in batches])
    assert inputs.shape[1] == 32 and (inputs[:-1] == EOS).any(dim=1).float().mean() > 0.3


def test_a_finite_stream_ends_with_a_padded_window(tmp_path):
    urls, docs = write_shards(tmp_path, "t", shards=1, docs_per_shard=2, max_len=40, seed=3)
    loader = StreamingLoader([Corpus(tuple(urls))], spec(seq_len=64, shuffle_shards=0), micro_batch=4)
    [(inputs, labels)] = list(loader)
    stream = [t for d in docs for t in (*d, EOS)]
    n = len(stream) - 1
    assert n < 64
    assert inputs[0, :n].tolist() == stream[:-1] and labels[0, :n].tolist() == stream[1:]
    assert (inputs[0, n:] == PAD).all() and (labels[0, n:] == -100).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_gives_the_uninterrupted_batches(corpus, seed):
    corpus_, _ = corpus
    rng = np.random.default_rng(seed)
    for rank, reference_loader in enumerate(loaders(corpus_, seed=seed)):
        reference = list(reference_loader)
        for stop in sorted({0, 1, len(reference) - 1, *rng.integers(1, len(reference), 2).tolist()}):
            first = loaders(corpus_, seed=seed)[rank]
            iterator = iter(first)
            head = [next(iterator) for _ in range(stop)]
            state = first.state_dict()
            del iterator
            resumed = loaders(corpus_, seed=seed)[rank]
            resumed.load_state_dict(state)
            got = head + list(resumed)
            assert len(got) == len(reference), (rank, stop)
            for (a, b), (c, d) in zip(got, reference):
                assert torch.equal(a, c) and torch.equal(b, d), (rank, stop)


def test_resume_in_an_endless_stream_crosses_epochs(corpus):
    corpus_, _ = corpus
    make = lambda: loaders(corpus_, dp_size=1, workers=2, epochs=None, seed=5)[0]  # noqa: E731
    reference = [b for _, b in zip(range(260), make())]  # > one epoch (about 170 batches)
    first = make()
    head = [b for _, b in zip(range(150), first)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = [b for _, b in zip(range(110), resumed)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(head + tail, reference))


def test_different_epochs_see_different_orders(corpus):
    corpus_, _ = corpus
    loader = loaders(corpus_, dp_size=1, workers=0, epochs=2)[0]
    streams = streams_by_reader(loader.iter_tagged())[0]
    docs = split_documents(streams)
    half = len(docs) // 2
    assert collections.Counter(docs[:half]) == collections.Counter(docs[half:]) and docs[:half] != docs[half:]


def test_mixture_weights_hold(tmp_path):
    a, _ = write_shards(tmp_path / "a", "a", shards=4, docs_per_shard=20, low=2, high=500, seed=1)
    b, _ = write_shards(tmp_path / "b", "b", shards=4, docs_per_shard=20, low=500, high=1000, seed=2)
    mix = [Corpus(tuple(a), weight=3.0), Corpus(tuple(b), weight=1.0)]
    loader = StreamingLoader(mix, spec(epochs=None, seq_len=16), micro_batch=8, num_workers=2)
    windows = torch.cat([x for _, (x, _) in zip(range(400), loader)])  # 3200 windows
    # EOS/PAD aside, a window's tokens all come from one corpus.
    from_a = ((windows < 500) | (windows == EOS)).all(dim=1)
    from_b = ((windows >= 500) | (windows == EOS)).all(dim=1)
    assert bool((from_a | from_b).all())
    share = from_a.float().mean().item()
    # Binomial std at n=3200 is 0.0077: 0.03 is ~4 sigma.
    assert abs(share - 0.75) < 0.03, share
    resumed = StreamingLoader(mix, spec(epochs=None, seq_len=16), micro_batch=8, num_workers=2)
    first = StreamingLoader(mix, spec(epochs=None, seq_len=16), micro_batch=8, num_workers=2)
    head = [x for _, (x, _) in zip(range(37), first)]
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(torch.cat(head + [x for _, (x, _) in zip(range(363), resumed)]), windows)


def test_resume_with_another_dp_size_skips_nothing(corpus):
    corpus_, docs = corpus
    two = loaders(corpus_, dp_size=2, workers=1)
    for loader in two:
        for _ in zip(range(10), loader):
            pass
    one = loaders(corpus_, dp_size=1, workers=1)[0]
    one.load_state_dict(two[0].state_dict())
    seen = collections.Counter(d for s in streams_by_reader(one.iter_tagged()).values() for d in split_documents(s))
    assert seen == collections.Counter(docs)  # the epoch restarts: every document again, none skipped


def test_state_from_other_data_is_refused(corpus, tmp_path):
    corpus_, _ = corpus
    other, _ = write_shards(tmp_path, "o", shards=2, docs_per_shard=3)
    loader = StreamingLoader([Corpus(tuple(other))], spec(), micro_batch=2)
    with pytest.raises(DataError, match="other corpora or another seed"):
        loader.load_state_dict(loaders(corpus_)[0].state_dict())


def test_our_shards_are_plain_webdataset(corpus):
    corpus_, docs = corpus
    samples = list(webdataset.WebDataset(list(corpus_.urls), shardshuffle=False))
    assert [tuple(np.load(io.BytesIO(s["npy"])).tolist()) for s in samples] == docs
    assert all(s["json"] for s in samples)


def test_pipe_and_http_urls(corpus):
    corpus_, _ = corpus
    local = corpus_.urls[0]
    expected = read_shard(local, VOCAB)
    piped = read_shard(f"pipe:cat {local}", VOCAB)
    assert all(np.array_equal(a, b) for a, b in zip(piped, expected)) and len(piped) == len(expected)

    folder = str(__import__("pathlib").Path(local).parent)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{__import__('pathlib').Path(local).name}"
        fetched = read_shard(url, VOCAB)
        assert len(fetched) == len(expected) and all(np.array_equal(a, b) for a, b in zip(fetched, expected))
    finally:
        server.shutdown()


# -- bad shards ---------------------------------------------------------------------------

def _shard_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


class _Trap:
    def __reduce__(self):
        return (open, ("/tmp/gptscale-unpickled-marker", "w"))


def test_pickles_in_a_shard_are_never_unpickled(tmp_path):
    import os
    marker = "/tmp/gptscale-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    tokens = npy_bytes(np.array([5, 6, 7], dtype=np.uint16))
    url = _shard_with(tmp_path / "evil.tar", [("0.npy", tokens), ("0.pickle", pickle.dumps(_Trap())),
                                              ("0.pyd", pickle.dumps(_Trap()))])
    assert [d.tolist() for d in read_shard(url, VOCAB)] == [[5, 6, 7]]
    assert not os.path.exists(marker)
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([_Trap()], dtype=object), allow_pickle=True)
    url = _shard_with(tmp_path / "objects.tar", [("0.npy", object_npy.getvalue())])
    with pytest.raises(DataError, match="not a plain array"):
        read_shard(url, VOCAB)
    assert not os.path.exists(marker)


def test_bad_shards_are_named(corpus, tmp_path):
    corpus_, _ = corpus
    good = open(corpus_.urls[0], "rb").read()
    truncated = tmp_path / "truncated.tar"
    # Cut inside a member, and exactly at member boundaries (which tarfile alone reads as valid).
    members = tarfile.open(corpus_.urls[0]).getmembers()
    boundaries = [-(-(m.offset_data + m.size) // 512) * 512 for m in members]  # end of each member, padded
    for cut in (len(good) // 2 + 100, boundaries[9], boundaries[-1]):
        truncated.write_bytes(good[:cut])
        with pytest.raises(DataError, match=f"shard {truncated} (cannot be read|is truncated)"):
            read_shard(str(truncated), VOCAB)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar" * 300)
    with pytest.raises(DataError, match=f"shard {garbage}"):
        read_shard(str(garbage), VOCAB)
    with pytest.raises(DataError, match="token id .* >= vocab size 50"):
        read_shard(corpus_.urls[0], 50)
    with pytest.raises(DataError, match="shard .*missing-000.tar does not exist"):
        Corpus(tuple(__import__("gptscale.data.stream", fromlist=["x"]).expand_urls(str(tmp_path / "missing-000.tar"))))
    with pytest.raises(DataError, match="has 8 shards but 9 readers"):
        list(StreamingLoader([corpus_], spec(), micro_batch=2, dp_rank=0, dp_size=9))
