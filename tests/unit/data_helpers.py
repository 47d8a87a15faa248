"""Small synthetic shard sets for loader tests (no tokenizer needed)."""
from pathlib import Path

import numpy as np

from gptscale.data.shards import ShardWriter

EOS = 1
PAD = 0


def write_shards(folder: Path, prefix: str, shards: int, docs_per_shard: int, *, seed: int = 0,
                 low: int = 2, high: int = 1000, max_len: int = 120) -> tuple[list[str], list[tuple[int, ...]]]:
    """Random documents (token ids in [low, high), lengths 1..max_len); returns (urls, documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, prefix, max_bytes=1 << 30, dtype=np.dtype(np.uint16))
    docs = []
    for _ in range(shards):
        for _ in range(docs_per_shard):
            doc = rng.integers(low, high, size=int(rng.integers(1, max_len + 1)))
            writer.add(doc, {"source": "synthetic"})
            docs.append(tuple(int(t) for t in doc))
        writer._close_shard()  # one shard per round, whatever its size
    return [str(folder / s.name) for s in writer.shards], docs


def streams_by_reader(tagged_batches) -> dict[int, list[int]]:
    """Reassemble each reader's token stream from its windows (they overlap by one token)."""
    streams: dict[int, list[int]] = {}
    for reader, inputs, labels in tagged_batches:
        for x, y in zip(inputs.tolist(), labels.tolist()):
            stream = streams.setdefault(reader, [x[0]])
            assert stream[-1] == x[0], "consecutive windows of a reader must overlap by one token"
            stream.extend(t for t in y if t != -100)
    return streams


def split_documents(stream: list[int]) -> list[tuple[int, ...]]:
    docs, current = [], []
    for t in stream:
        if t == EOS:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert not current, "a stream ends with EOS"
    return docs
