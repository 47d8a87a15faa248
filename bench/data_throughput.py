"""Is the data pipeline fast enough? Prepare and loader throughput vs what training consumes.

Measures, in one run on this machine:
  prepare   the embedded corpus (builtin:python, ~12 MB) -> shards: MB/s of text, tokens/s
  loader    StreamingLoader over those shards, seq_len 256: tokens/s per loader worker
  training  a fp32 CPU training step (forward, backward, AdamW) of the tiny and GPT-2 124M
            presets: the tokens/s one training process consumes
and prints the loader/training ratio (target: >= 20x).

    .venv/bin/python bench/data_throughput.py [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gptscale.config import ModelConfig
from gptscale.data.prepare import prepare
from gptscale.data.sources import ReadOptions, read_documents
from gptscale.data.stream import StreamingLoader, StreamSpec, corpus_from
from gptscale.data.tokenizer import train_tokenizer
from gptscale.model.gpt import GPT


def loader_rate(folder: str, manifest: dict, workers: int, seconds: float = 6.0) -> float:
    tok = manifest["tokenizer"]
    spec = StreamSpec(seq_len=256, vocab_size=tok["vocab_size"], eos_id=tok["eos_id"], pad_id=tok["pad_id"],
                      seed=0, shuffle_shards=2, epochs=None)
    loader = StreamingLoader([corpus_from(folder, "train")], spec, micro_batch=8, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(iterator)[0].numel()
    return tokens / (time.perf_counter() - start)


def training_rate(name: str, batch: int, seq_len: int, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(name, vocab_size=4096))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (batch, seq_len))

    def step():
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq_len * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes and loader workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        texts = (d.text for d in read_documents(["builtin:pydoc"], ReadOptions()))
        train_tokenizer(texts, 4096, Path(tmp) / "tok")
        start = time.perf_counter()
        manifest = prepare(["builtin:python"], str(Path(tmp) / "tok"), Path(tmp) / "shards", shard_bytes=1 << 20,
                           workers=args.workers, progress=False)
        elapsed = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        print(f"prepare   {manifest['text_bytes'] / 1e6 / elapsed:8.2f} MB/s of text  {tokens / elapsed:12,.0f} tokens/s"
              f"   ({args.workers} tokenizer processes, {elapsed:.1f}s incl. start-up)")
        per_worker = {w: loader_rate(str(Path(tmp) / "shards"), manifest, w) for w in (1, args.workers)}
        for w, rate in per_worker.items():
            print(f"loader    {rate:12,.0f} tokens/s with {w} worker(s) = {rate / w:12,.0f} tokens/s per worker")
    one_worker = per_worker[1]
    for name, batch, seq, steps in (("tiny", 8, 256, 5), ("gpt2-124m", 1, 1024, 2)):
        rate = training_rate(name, batch, seq, steps)
        print(f"training  {rate:12,.0f} tokens/s  {name:<10} (fp32 CPU step, batch {batch} x {seq})"
              f"   loader (1 worker) / training = {one_worker / rate:8.1f}x")


if __name__ == "__main__":
    main()
