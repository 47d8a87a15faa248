"""Pretraining batches: the streaming shard loader over a prepared folder, or synthetic sequences."""
from __future__ import annotations

from typing import Iterator

import torch

from gptscale.config import RunConfig
from gptscale.data.shards import matching_tokenizer, read_manifest
from gptscale.data.stream import StreamingLoader, StreamSpec, corpus_from
from gptscale.errors import ConfigError, DataError


class SyntheticBatches:
    """Learnable random sequences (t_i = start + i * stride mod V) whose global batch at each
    optimizer step is a pure function of (seed, step), however it is split over DP ranks and
    micro-steps; so runs with different layouts see exactly the same data."""

    def __init__(self, vocab: int, seq_len: int, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.vocab, self.seq_len, self.micro_batch = vocab, seq_len, micro_batch
        self.grad_accum, self.dp_rank, self.dp_size, self.seed = grad_accum, dp_rank, dp_size, seed
        self.position = 0  # micro-batches handed out

    def global_batch(self, step: int) -> torch.Tensor:
        rows = self.grad_accum * self.dp_size * self.micro_batch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        start = torch.randint(0, self.vocab, (rows, 1), generator=g)
        stride = torch.randint(1, 8, (rows, 1), generator=g)
        return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab  # (rows, T + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            step, micro = divmod(self.position, self.grad_accum)
            first = (micro * self.dp_size + self.dp_rank) * self.micro_batch
            rows = self.global_batch(step)[first:first + self.micro_batch]
            self.position += 1
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or type(state.get("position")) is not int or state["position"] < 0:
            raise DataError(f"the synthetic data position in the checkpoint is damaged ({state!r:.80})")
        self.position = state["position"]


def tokenizer_for(cfg: RunConfig):
    """The data folder's tokenizer (checked against its manifest), or None for synthetic data."""
    if cfg.data.synthetic:
        return None
    manifest = read_manifest(cfg.data.path)
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                          f"(data.path={cfg.data.path}); set model.vocab_size={vocab}")
    return matching_tokenizer(cfg.data.path, manifest)


def _spec(cfg: RunConfig, shuffle: int) -> StreamSpec:
    tok = read_manifest(cfg.data.path)["tokenizer"]
    return StreamSpec(seq_len=cfg.data.seq_len, vocab_size=tok["vocab_size"], eos_id=tok["eos_id"],
                      pad_id=tok["pad_id"], seed=cfg.data.seed, shuffle_shards=shuffle, epochs=None)


def _stream(cfg: RunConfig, split: str, dp_rank: int, dp_size: int, workers: int, shuffle: int) -> StreamingLoader:
    return StreamingLoader([corpus_from(cfg.data.path, split)], _spec(cfg, shuffle), micro_batch=cfg.train.micro_batch,
                           dp_rank=dp_rank, dp_size=dp_size, num_workers=workers)


def train_batches(cfg: RunConfig, dp_rank: int, dp_size: int):
    if cfg.data.synthetic:
        return SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.grad_accum,
                                dp_rank, dp_size, cfg.data.seed)
    return _stream(cfg, "train", dp_rank, dp_size, cfg.data.num_workers, cfg.data.shuffle_shards)


def redeal_train_batches(cfg: RunConfig, states: list[dict], step: int, dp_rank: int, dp_size: int) -> dict:
    """This DP rank's `train_batches` state when a run saved with len(states) DP ranks continues
    with `dp_size`: synthetic data continues at the step (its batches do not depend on the
    layout); the shard stream re-deals what the epoch has not consumed to the new readers."""
    if cfg.data.synthetic:
        return {"position": step * cfg.train.grad_accum}
    from gptscale.data.stream import redeal

    return redeal(states, dp_size, cfg.data.num_workers, corpora=[corpus_from(cfg.data.path, "train")],
                  spec=_spec(cfg, cfg.data.shuffle_shards))[dp_rank]


def validation_batches(cfg: RunConfig, dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same held-out batches at every evaluation. Every DP rank reads the whole (small)
    validation split, so it works with however few validation shards there are."""
    if cfg.data.synthetic:
        held_out = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.micro_batch, 1, dp_rank,
                                    dp_size, cfg.data.seed + 7777)
    else:
        held_out = _stream(cfg, "val", 0, 1, 0, 0)
    return [batch for _, batch in zip(range(cfg.train.eval_batches), held_out)]
