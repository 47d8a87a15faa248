"""Byte-level BPE tokenizer: trained offline on local files, saved in Hugging Face's format.

The saved folder (tokenizer.json + tokenizer_config.json + special_tokens_map.json) loads
unchanged with `transformers.PreTrainedTokenizerFast.from_pretrained(folder)`. Byte-level
BPE with no normaliser round-trips any text exactly: decode(encode(x)) == x.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptscale.atomic import write_text_atomic
from gptscale.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in a tokenizer trained here


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> "TextTokenizer":
    """Train a byte-level BPE on `texts` and save it in `out_dir` (created if missing)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "tokenizer.json", tok.to_str(pretty=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False}
    write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text_atomic(out / "special_tokens_map.json",
                      json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    return TextTokenizer.load(out)


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and a content hash."""

    tokenizer: Tokenizer
    eos_id: int
    bos_id: int | None
    pad_id: int
    sha256: str  # of tokenizer.json: shards record it, so a mismatched tokenizer is caught
    path: str

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Load a folder holding tokenizer.json (ours or any local Hugging Face tokenizer)."""
        folder = Path(path)
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.is_file():
            raise DataError(f"tokenizer {str(path)!r}: no tokenizer.json there; train one with "
                            f"'gptscale data train-tokenizer' or point at a Hugging Face tokenizer folder")
        raw = file.read_bytes()
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise DataError(f"tokenizer {str(file)!r} cannot be loaded: {exc}") from None
        specials = _special_tokens(file.parent)
        ids = {name: tok.token_to_id(text) for name, text in specials.items() if text is not None}
        eos = ids.get("eos_token")
        if eos is None:
            raise DataError(f"tokenizer {str(file)!r} has no end-of-text token; set eos_token in "
                            f"tokenizer_config.json next to it")
        pad = ids.get("pad_token")
        return cls(tokenizer=tok, eos_id=eos, bos_id=ids.get("bos_token"), pad_id=eos if pad is None else pad,
                   sha256=hashlib.sha256(raw).hexdigest(), path=str(file))

    @functools.cached_property
    def vocab_size(self) -> int:
        """Rows an embedding needs: the largest id + 1 (a tokenizer's ids need not be contiguous)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _special_tokens(folder: Path) -> dict[str, str | None]:
    """Special tokens from tokenizer_config.json / special_tokens_map.json, else our defaults."""
    found: dict[str, str | None] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise DataError(f"{file}: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise DataError(f"{file}: not a JSON object of tokenizer settings")
        for key in found:
            value = data.get(key, found[key])
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise DataError(f"{file}: {key} must be a token's text, found {value!r}")
            found[key] = value
    return found
