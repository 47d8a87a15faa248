"""Supervised fine-tuning (SFT) data: chat records -> token ids + a loss mask per example,
written as webdataset shards by `gptscale data prepare-sft`, and the resumable batch
iterator the trainer reads them with.

Input: JSON lines, one record per line, either
    {"prompt": str, "response": str}                                   (other keys ignored)
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
where the last message is the assistant's. A prompt/response record is exactly the record
{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}.

Default template (--template default, and --template auto when the tokenizer has no
chat_template). [BOS] and [EOS] are the tokenizer's special token ids (ours: <|bos|>,
<|eos|>), never text; the pieces, in message order:
    [BOS]                                 once, first, if the tokenizer has one     mask 0
    "System: " + content + "\\n"           each system message                       mask 0
    "User: " + content + "\\n"             each user message                         mask 0
    "Assistant: "                         each assistant message, then:             mask 0
    content + [EOS]                       its text and its end-of-turn token        mask 1
Nothing follows [EOS]: the next message's text starts right after it. For example
    <|bos|>System: Be brief.\\nUser: 2+2?\\nAssistant: 4<|eos|>User: 3+3?\\nAssistant: 6<|eos|>
Consecutive mask-0 texts are encoded as one piece and each assistant content as another,
so the mask boundary is exact (byte-level BPE could otherwise merge tokens across it).

Tokenizer template (--template tokenizer, and auto when the tokenizer folder's
tokenizer_config.json has a "chat_template"): the jinja string is rendered in jinja2's
ImmutableSandboxedEnvironment (it comes from disk) with `messages`, `bos_token`,
`eos_token`, `add_generation_prompt`. For assistant message i, the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is labelled:
whatever the template puts there (the content and its end-of-turn marker, typically). Each
of these renderings must be a prefix of the next, else a one-line error names the template.

Every example records `prompt_tokens`, the number of tokens before the last assistant
content starts, and `answer`, that content: exact-match evaluation generates from
ids[:prompt_tokens] and compares with the answer. An example longer than seq_len + 1 tokens
is cut on the right (ids and mask alike, counted); a prompt of seq_len tokens or more, which
leaves no room for the response, is an error.

Shards (see gptscale/data/shards.py), splits "train" and "val": per example a key
DDDDDDDDDD with members KEY.npy (token ids, the manifest's dtype: uint16 or uint32),
KEY.mask.npy (uint8 0/1, the same length) and KEY.json ({"prompt_tokens", "answer",
"source", "line", "tokens"}). The manifest adds "kind": "sft", "seq_len", "template", and
per split "labelled_tokens" and "truncated". A record goes to "val" when it comes from
--val-input, or with --val-fraction F by a hash of (--seed, its messages): duplicates land
in the same split. The same input gives byte-identical shards.

Batches: an example with tokens t and mask m is one row: input t[:-1] then pad_id up to
seq_len; label j is t[j+1] where m[j+1] is 1, else IGNORE_INDEX (-100), as on padding. See
SFTBatches for the order over epochs, how it splits over DP ranks, and exact resume.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from gptscale.atomic import staged_folder
from gptscale.data.prepare import TOKENIZER_DIR, copy_tokenizer, is_validation
from gptscale.data.read import MAX_MEMBER_BYTES, read_shard_records, unsigned_array
from gptscale.data.shards import (FORMAT, MANIFEST, ShardWriter, npy_bytes, read_manifest, shard_checks,
                                  shard_info_dicts, token_dtype, write_manifest)
from gptscale.data.sources import open_text
from gptscale.data.tokenizer import TextTokenizer
from gptscale.errors import DataError

KIND = "sft"
ROLES = ("system", "user", "assistant")
ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
TEMPLATES = ("auto", "default", "tokenizer")
FORMS = 'write {"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}'
CHUNK = 256  # records per encode_batch call: the tokenizer's threads see enough work
PROGRESS_BYTES = 8 << 20  # inputs this large show a progress bar
STATE_KEYS = ("examples_before", "position", "global_batch", "grad_accum")
MAX_STATE_VALUE = 1 << 62  # far beyond any run; keeps epoch numbers small enough to seed with

Piece = tuple[Union[str, int], bool]  # (text, or one special token's id; labelled)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


# -- records -> messages ------------------------------------------------------------------------

def record_messages(record: object, where: str) -> list[dict]:
    """The checked messages of one record; a prompt/response record as [user, assistant]."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, found a {type(record).__name__}; {FORMS}")
    pair = "prompt" in record or "response" in record
    if "messages" in record:
        if pair:
            raise DataError(f'{where}: the record has both "messages" and "prompt"/"response"; keep one form')
        return _checked_messages(record["messages"], where)
    if not pair:
        raise DataError(f'{where}: the record has neither "prompt"/"response" nor "messages" '
                        f'(keys: {str(sorted(record))[:80]}); {FORMS}')
    for key in ("prompt", "response"):
        if key not in record:
            raise DataError(f'{where}: the record has no "{key}"; {FORMS}')
        if not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" is a {type(record[key]).__name__}, not a string')
    if not record["response"].strip():
        raise DataError(f"{where}: the response is empty; write one or remove the record")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def _checked_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}}')
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict):
            raise DataError(f'{where}: message {i} is a {type(message).__name__}, not {{"role": ..., "content": ...}}')
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r:.40}; use system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}, "
                            f"not a string")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {i} (assistant) is empty; write the response or remove the message")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message is the {checked[-1]['role']}'s, not the assistant's; end each "
                        f"conversation with the response to learn")
    return checked


# -- templates: messages -> pieces ----------------------------------------------------------------

class DefaultTemplate:
    """The documented default rendering (module docstring), from the tokenizer's special ids."""

    kind = "default"

    def __init__(self, bos_id: int | None, eos_id: int):
        self.bos_id, self.eos_id = bos_id, eos_id

    def pieces(self, messages: list[dict], where: str) -> list[Piece]:
        pieces: list[Piece] = [] if self.bos_id is None else [(self.bos_id, False)]
        text = ""  # unlabelled text not yet emitted: joined, so it is encoded as one piece
        for message in messages:
            if message["role"] != "assistant":
                text += f"{ROLE_PREFIX[message['role']]}{message['content']}\n"
                continue
            pieces += [(text + ROLE_PREFIX["assistant"], False), (message["content"], True), (self.eos_id, True)]
            text = ""
        return pieces  # the last message is the assistant's: no text is left over


def _raise_from_template(message: object):
    from jinja2 import TemplateError

    raise TemplateError(str(message))


class ChatTemplate:
    """A tokenizer's jinja chat_template, rendered in jinja2's immutable sandbox (it comes
    from disk), with Hugging Face's options and `raise_exception`."""

    kind = "tokenizer"

    def __init__(self, source: str, name: str, bos_token: str, eos_token: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.name, self.tokens = name, {"bos_token": bos_token, "eos_token": eos_token}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_from_template
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise DataError(f"{name} is not a valid jinja template ({_one_line(exc)}); fix it or pass "
                            f"--template default") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except Exception as exc:  # the template is someone else's code: any failure of it is theirs
            raise DataError(f"{where}: {self.name} fails on this record ({type(exc).__name__}: {_one_line(exc)}); "
                            f"fix the template or pass --template default") from None

    def pieces(self, messages: list[dict], where: str) -> list[Piece]:
        full = self.render(messages, False, where)
        pieces: list[Piece] = []
        done = 0  # characters of `full` already in pieces
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True, where)
            turn = self.render(messages[:i + 1], False, where)
            if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= done):
                raise DataError(f"{where}: {self.name} does not render message {i} (assistant) as a continuation: "
                                f"messages[:{i}] with add_generation_prompt=True must be a prefix of "
                                f"messages[:{i + 1}], and each of those of the whole conversation; fix the template "
                                f"or pass --template default")
            if len(turn) == len(prompt):
                raise DataError(f"{where}: {self.name} renders nothing for message {i} (assistant), so there is "
                                f"nothing to learn; fix the template or pass --template default")
            pieces += [(full[done:len(prompt)], False), (full[len(prompt):len(turn)], True)]
            done = len(turn)
        return pieces + [(full[done:], False)]


MAX_TOKENIZER_CONFIG_BYTES = 4 << 20  # Hugging Face's largest tokenizer configs (added-token tables) are ~1 MB


def chat_template_of(folder: Path) -> str | None:
    """The jinja chat_template of a tokenizer folder's tokenizer_config.json, if it has one."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return None
    if file.stat().st_size > MAX_TOKENIZER_CONFIG_BYTES:
        raise DataError(f"{file} is {file.stat().st_size:,} bytes; a tokenizer config (chat_template included) is "
                        f"far smaller, at most {MAX_TOKENIZER_CONFIG_BYTES:,}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{file}: not valid JSON ({type(exc).__name__})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # Hugging Face's named templates: [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{file}: chat_template must be a jinja string (or a list holding one named 'default')")
    return template


def choose_template(tokenizer: TextTokenizer, mode: str = "auto") -> DefaultTemplate | ChatTemplate:
    """--template auto (the tokenizer's chat_template if it has one, else the default), default, tokenizer."""
    if mode not in TEMPLATES:
        raise DataError(f"--template {mode!r} is unknown; choose auto, default or tokenizer")
    folder = Path(tokenizer.path).parent
    source = None if mode == "default" else chat_template_of(folder)
    if source is None:
        if mode == "tokenizer":
            raise DataError(f"--template tokenizer: {folder / 'tokenizer_config.json'} has no chat_template; "
                            f"add one or pass --template default")
        return DefaultTemplate(tokenizer.bos_id, tokenizer.eos_id)
    text = tokenizer.tokenizer.id_to_token
    bos = "" if tokenizer.bos_id is None else text(tokenizer.bos_id)
    return ChatTemplate(source, f"the chat_template of {folder / 'tokenizer_config.json'}", bos,
                        text(tokenizer.eos_id))


# -- pieces -> tokens + mask --------------------------------------------------------------------

@dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # uint32
    mask: np.ndarray  # uint8: 1 where the token is learned
    prompt_tokens: int  # tokens before the last assistant content starts
    answer: str  # the last assistant content


def tokenize_conversations(conversations: list[list[dict]], tokenizer: TextTokenizer,
                           template: DefaultTemplate | ChatTemplate,
                           wheres: list[str] | None = None) -> list[Tokenized]:
    """Checked messages -> tokens and loss masks; every text piece is encoded on its own
    (in one batch), so no token spans a mask boundary."""
    wheres = wheres or [f"conversation {i}" for i in range(len(conversations))]
    pieces = [template.pieces(messages, where) for messages, where in zip(conversations, wheres)]
    texts = [piece for ps in pieces for piece, _ in ps if isinstance(piece, str) and piece]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    return [_assemble(ps, encoded, messages[-1]["content"]) for ps, messages in zip(pieces, conversations)]


def _assemble(pieces: list[Piece], encoded: Iterator[list[int]], answer: str) -> Tokenized:
    ids: list[int] = []
    mask: list[int] = []
    prompt_tokens = 0
    for piece, labelled in pieces:
        tokens = [piece] if isinstance(piece, int) else (next(encoded) if piece else [])
        if labelled and isinstance(piece, str):  # the last labelled text is the last assistant turn
            prompt_tokens = len(ids)
        ids += tokens
        mask += [int(labelled)] * len(tokens)
    return Tokenized(np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8), prompt_tokens, answer)


def fit_to_length(example: Tokenized, seq_len: int, where: str) -> tuple[Tokenized, bool]:
    """The example cut to seq_len + 1 tokens (one row of inputs and shifted labels), and
    whether it was cut; a prompt that leaves no room for the response is an error."""
    if example.prompt_tokens >= seq_len:
        raise DataError(f"{where}: the prompt is {example.prompt_tokens} tokens, --seq-len {seq_len} leaves no room "
                        f"for the response; shorten it or raise --seq-len")
    if example.prompt_tokens < 1:
        raise DataError(f"{where}: nothing precedes the response, so its first token cannot be learned; use a "
                        f"template that renders a prompt (a bos_token or a role marker)")
    if example.ids.size <= seq_len + 1:
        return example, False
    keep = seq_len + 1
    return Tokenized(example.ids[:keep], example.mask[:keep], example.prompt_tokens, example.answer), True


# -- prepare-sft ----------------------------------------------------------------------------------

def read_records(path: str) -> Iterator[tuple[str, int, list[dict], int]]:
    """(where, line number, checked messages, bytes of the line) for each non-blank line of a
    JSON lines file (.gz / .zst decompressed); an empty file is an error."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file; --input and --val-input take JSON lines files")
    number, found = 0, False
    try:
        with open_text(file) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    problem = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                    raise DataError(f"{where}: invalid JSON ({problem}); write one JSON object per line") from None
                found = True
                yield where, number, record_messages(record, where), len(line.encode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} line {number + 1}: not valid UTF-8; re-encode the file as UTF-8") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({_one_line(exc)}); is it truncated or corrupt?") from None
    if not found:
        raise DataError(f"{path}: holds no records (the file is empty); give one JSON record per line")


@dataclass
class _Split:
    writer: ShardWriter
    labelled: int = 0
    truncated: int = 0


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out is replaced only with --overwrite, and only if it is a prepared folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"--out {out} already exists; pass --overwrite to replace it or choose another --out")
    if not (out / MANIFEST).is_file():
        raise DataError(f"--out {out} holds files but no {MANIFEST}, so it is not a prepared folder and --overwrite "
                        f"will not replace it; choose another --out")


def prepare_sft(inputs: list[str], tokenizer_path: str | Path, out_dir: str | Path, *, seq_len: int,
                val_inputs: list[str] | None = None, val_fraction: float | None = None, template: str = "auto",
                shard_bytes: int = 64 << 20, overwrite: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Tokenize chat records into train/val SFT shards in `out_dir` (written in full or not at
    all); returns the manifest written."""
    val_inputs = list(val_inputs or [])
    _check_options(inputs, val_inputs, val_fraction, seq_len)
    out = Path(os.path.abspath(out_dir))
    _check_out(out, overwrite)
    tokenizer = TextTokenizer.load(tokenizer_path)
    renderer = choose_template(tokenizer, template)
    with staged_folder(out, replace=out.exists(), make_parents=True) as staging:
        copy_tokenizer(Path(tokenizer.path).parent, staging / TOKENIZER_DIR)
        splits, text_bytes = _write_splits(inputs, val_inputs, val_fraction, seed, tokenizer, renderer, staging,
                                           seq_len, shard_bytes, progress)
        manifest = _manifest(inputs, val_inputs, val_fraction, seed, tokenizer, renderer, seq_len, splits, text_bytes)
        write_manifest(staging, manifest)
    return manifest


def _check_options(inputs: list[str], val_inputs: list[str], val_fraction: float | None, seq_len: int) -> None:
    if not inputs:
        raise DataError("no --input given")
    if val_inputs and val_fraction is not None:
        raise DataError("--val-input and --val-fraction both given; hold out validation records one way")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    if type(seq_len) is not int or seq_len < 1:
        raise DataError(f"--seq-len {seq_len!r} must be a positive integer")


def _write_splits(inputs, val_inputs, val_fraction, seed, tokenizer, renderer, staging, seq_len, shard_bytes,
                  progress) -> tuple[dict[str, _Split], int]:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    splits = {name: _Split(ShardWriter(staging, name, shard_bytes, dtype)) for name in ("train", "val")}
    files = [(f, "train") for f in inputs] + [(f, "val") for f in val_inputs]
    total = sum(Path(f).stat().st_size for f, _ in files if Path(f).is_file())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare-sft", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or total < PROGRESS_BYTES)
    text_bytes = 0
    try:
        for file, split in files:
            for where, line, messages, example, nbytes in _examples(file, tokenizer, renderer):
                held_out = split == "train" and val_fraction is not None and _held_out(messages, seed, val_fraction)
                _add(splits["val" if held_out else split], example, seq_len, file, line, where)
                text_bytes += nbytes
                bar.update(nbytes)
        for split in splits.values():
            split.writer.close()
    except BaseException:
        for split in splits.values():
            split.writer.abort()
        raise
    finally:
        bar.close()
    _check_counts(splits, inputs, val_fraction)
    return splits, text_bytes


def _examples(file: str, tokenizer, renderer) -> Iterator[tuple[str, int, list[dict], Tokenized, int]]:
    """(where, line, messages, tokenized example, line bytes) of a file, CHUNK records at a time."""
    records = read_records(file)
    while chunk := list(itertools.islice(records, CHUNK)):
        tokenized = tokenize_conversations([m for _, _, m, _ in chunk], tokenizer, renderer, [w for w, *_ in chunk])
        for (where, line, messages, nbytes), example in zip(chunk, tokenized):
            yield where, line, messages, example, nbytes


def _held_out(messages: list[dict], seed: int, val_fraction: float) -> bool:
    """--val-fraction: by a hash of the seed and the messages, so duplicates share a split."""
    return is_validation(f"{seed}:{json.dumps(messages, sort_keys=True, ensure_ascii=False)}", val_fraction)


def _add(split: _Split, example: Tokenized, seq_len: int, file: str, line: int, where: str) -> None:
    example, cut = fit_to_length(example, seq_len, where)
    meta = {"prompt_tokens": example.prompt_tokens, "answer": example.answer, "source": file, "line": line}
    if len(json.dumps(meta)) + 64 > MAX_MEMBER_BYTES["json"]:  # readers refuse larger metadata
        raise DataError(f"{where}: the response is {len(example.answer):,} characters, too long to keep as the "
                        f"reference answer; shorten it")
    split.writer.add(example.ids, meta, {"mask.npy": npy_bytes(example.mask)})
    split.labelled += int(example.mask.sum())
    split.truncated += cut


def _check_counts(splits: dict[str, _Split], inputs: list[str], val_fraction: float | None) -> None:
    if splits["train"].writer.documents == 0:
        raise DataError(f"--input {' '.join(inputs)} left no training examples (--val-fraction {val_fraction} "
                        f"held out every one); lower --val-fraction or add records")
    if val_fraction is not None and splits["val"].writer.documents == 0:
        raise DataError(f"--val-fraction {val_fraction} left no example for the validation split "
                        f"({splits['train'].writer.documents} records in all); raise it, add records or pass "
                        f"--val-input")


def _manifest(inputs, val_inputs, val_fraction, seed, tokenizer, renderer, seq_len, splits, text_bytes) -> dict:
    def split_info(split: _Split) -> dict:
        shards = split.writer.shards
        return {"documents": split.writer.documents, "tokens": sum(s.tokens for s in shards),
                "labelled_tokens": split.labelled, "truncated": split.truncated, "shards": shard_info_dicts(shards)}

    return {
        "format": FORMAT, "kind": KIND, "seq_len": seq_len, "template": renderer.kind,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "sources": list(inputs) + list(val_inputs), "val_sources": list(val_inputs),
        "val_fraction": val_fraction, "seed": seed, "text_bytes": text_bytes, "skipped": {},
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id, "folder": TOKENIZER_DIR},
        "splits": {name: split_info(split) for name, split in splits.items()},
    }


def summary(manifest: dict, out: str) -> str:
    """The one-line report of prepare-sft."""
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    both = (train, val)
    return (f"sft: {train['documents']:,} train + {val['documents']:,} val examples, "
            f"{sum(s['tokens'] for s in both):,} tokens ({sum(s['labelled_tokens'] for s in both):,} labelled), "
            f"{sum(s['truncated'] for s in both):,} truncated to --seq-len {manifest['seq_len']} + 1, "
            f"{sum(len(s['shards']) for s in both)} shards, template {manifest['template']} -> {out}/{MANIFEST}")


# -- loading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFTExamples:
    """One split in memory: every example's ids in one array (the shards' dtype, 2 or 4 bytes
    a token), the masks in another (1 byte a token), int64 offsets, and per example its
    prompt length and reference answer; about 3-5 bytes a token plus the answers' text."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray  # example i is tokens[offsets[i]:offsets[i + 1]]
    prompt_tokens: np.ndarray  # int64
    answers: list[str]
    seq_len: int  # the folder's --seq-len: no example has more than seq_len + 1 tokens
    vocab_size: int

    def __len__(self) -> int:
        return len(self.answers)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def loss_mask(self, i: int) -> np.ndarray:
        return self.mask[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def build(cls, rows: list[tuple[np.ndarray, np.ndarray, int, str]], seq_len: int, vocab_size: int) -> "SFTExamples":
        """From (ids, mask, prompt_tokens, answer) rows, each checked as a shard's are."""
        for i, (ids, mask, prompt_tokens, _) in enumerate(rows):
            _check_example(f"example {i}", np.asarray(ids), np.asarray(mask), prompt_tokens, seq_len, vocab_size)
        lengths = np.array([len(ids) for ids, *_ in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate([np.asarray(r[0]) for r in rows]) if rows else np.zeros(0, np.uint32)
        mask = np.concatenate([np.asarray(r[1], dtype=np.uint8) for r in rows]) if rows else np.zeros(0, np.uint8)
        return cls(tokens, mask, offsets, np.array([r[2] for r in rows], dtype=np.int64), [r[3] for r in rows],
                   seq_len, vocab_size)


def is_sft_folder(folder: str | Path) -> bool:
    """Whether a prepared folder holds fine-tuning examples (its manifest's kind is "sft");
    a folder without a kind holds pretraining documents."""
    return read_manifest(folder).get("kind") == KIND


def load_sft_split(folder: str | Path, split: str) -> SFTExamples:
    """Every example of a split, read through the checked shard reader (sha256 and counts
    against the manifest, member names and sizes, no pickles) and validated."""
    manifest = read_manifest(folder)
    if manifest.get("kind") != KIND:
        raise DataError(f"{Path(folder) / MANIFEST}: not a fine-tuning folder (no \"kind\": \"sft\"); make one with "
                        f"'gptscale data prepare-sft'")
    vocab, seq_len = manifest["tokenizer"]["vocab_size"], manifest["seq_len"]
    rows = []
    for url, expected in shard_checks(folder, split, manifest):
        for key, ids, members in read_shard_records(url, vocab, expected):
            rows.append(_shard_example(url, key, ids, members, seq_len, vocab))
    return SFTExamples.build(rows, seq_len, vocab)


def _shard_example(url: str, key: str, ids: np.ndarray, members: dict, seq_len: int, vocab: int):
    where = f"shard {url}: example {key}"
    for suffix in ("mask.npy", "json"):
        if suffix not in members:
            raise DataError(f"{where} has no .{suffix} member; the shard is not from 'gptscale data prepare-sft' "
                            f"(re-run it)")
    mask = unsigned_array(members["mask.npy"], f"{where} mask")
    meta = json.loads(members["json"])  # the reader checked that it parses
    prompt_tokens = meta.get("prompt_tokens") if isinstance(meta, dict) else None
    answer = meta.get("answer") if isinstance(meta, dict) else None
    if type(prompt_tokens) is not int or not isinstance(answer, str):
        raise DataError(f"{where}: its .json lacks an integer prompt_tokens and a string answer; re-run "
                        f"'gptscale data prepare-sft'")
    _check_example(where, ids, mask, prompt_tokens, seq_len, vocab)
    return ids, mask, prompt_tokens, answer


def _check_example(where: str, ids: np.ndarray, mask: np.ndarray, prompt_tokens: int, seq_len: int, vocab: int):
    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}; the data is damaged or not gptscale's (re-run 'gptscale data prepare-sft')")

    if ids.ndim != 1 or mask.shape != ids.shape:
        raise bad(f"its mask has shape {mask.shape}, its ids {ids.shape}")
    if ids.size < 2 or ids.size > seq_len + 1:
        raise bad(f"it has {ids.size} tokens, not 2 to seq_len + 1 = {seq_len + 1}")
    if mask.dtype.kind not in "uib" or int(mask.min()) < 0 or int(mask.max()) > 1:
        raise bad("its mask holds values other than 0 and 1")
    if ids.dtype.kind not in "ui" or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise bad(f"its token ids are not all integers in [0, vocabulary size {vocab})")
    if type(prompt_tokens) is not int or not 1 <= prompt_tokens < ids.size or mask[prompt_tokens] != 1:
        raise bad(f"prompt_tokens {prompt_tokens!r:.20} does not point at its first response token")


# -- batches --------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n examples in an epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed & (2 ** 64 - 1), epoch]).permutation(n)


def _collate(examples: SFTExamples, rows: list[int], seq_len: int, pad_id: int):
    """(input_ids, labels) LongTensors (len(rows), seq_len): inputs t[:-1] then pad_id; labels
    t[j + 1] where the mask marks it, else IGNORE_INDEX."""
    import torch  # here, not at the top: prepare-sft needs no torch

    from gptscale.parallel.layers import IGNORE_INDEX

    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for r, i in enumerate(rows):
        ids, mask = examples.ids(i).astype(np.int64), examples.loss_mask(i)  # signed: labels hold -100
        n = ids.size - 1
        inputs[r, :n] = ids[:-1]
        labels[r, :n] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _check_fits(examples: SFTExamples, seq_len: int) -> None:
    if examples.seq_len > seq_len:
        raise DataError(f"the fine-tuning examples were prepared with --seq-len {examples.seq_len}, longer than "
                        f"data.seq_len={seq_len}; set data.seq_len >= {examples.seq_len} or re-run "
                        f"'gptscale data prepare-sft --seq-len {seq_len}'")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if type(value) is not int or value < 1:
            raise DataError(f"{name}={value!r} must be a positive integer")


class SFTBatches:
    """The trainer's endless, resumable iterator of (input_ids, labels) micro-batches.

    Global example index g is entry g % N of epoch g // N's order (`epoch_order(N, seed, e)`,
    or file order without shuffle). An optimizer step takes G = micro_batch * dp_size *
    grad_accum consecutive global indices; micro-step `micro` of DP rank r takes
    examples_before + step * G + (micro * dp_size + r) * micro_batch and the micro_batch - 1
    after it. So the examples of a step do not depend on how it is split over ranks and
    micro-steps, and every rank holds the same state: `examples_before` (global indices
    consumed before `position` started counting) and `position` (micro-batches handed out
    since). `redeal_sft_state` turns a saved state into one for any other layout.
    """

    def __init__(self, examples: SFTExamples, seq_len: int, pad_id: int, micro_batch: int, grad_accum: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        _positive(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, dp_size=dp_size)
        if type(dp_rank) is not int or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank!r} is not in [0, {dp_size})")
        if len(examples) == 0:
            raise DataError("the fine-tuning split holds no examples; re-run 'gptscale data prepare-sft'")
        _check_fits(examples, seq_len)
        if type(seed) is not int or type(pad_id) is not int or pad_id < 0:
            raise DataError(f"seed={seed!r:.20} and pad_id={pad_id!r:.20} must be integers (pad_id >= 0)")
        self.examples, self.seq_len, self.pad_id, self.seed, self.shuffle = examples, seq_len, pad_id, seed, shuffle
        self.micro_batch, self.grad_accum, self.dp_rank, self.dp_size = micro_batch, grad_accum, dp_rank, dp_size
        self.examples_before = self.position = 0
        self._orders: dict[int, np.ndarray] = {}  # the one or two epochs a micro-batch touches

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size * self.grad_accum

    def example_at(self, g: int) -> int:
        """The example at global index g."""
        epoch, i = divmod(g, len(self.examples))
        if not self.shuffle:
            return i
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = epoch_order(len(self.examples), self.seed, epoch)
        return int(self._orders[epoch][i])

    def global_indices(self, position: int) -> range:
        """The global indices of this rank's micro-batch number `position`."""
        step, micro = divmod(position, self.grad_accum)
        within = (micro * self.dp_size + self.dp_rank) * self.micro_batch
        first = self.examples_before + step * self.global_batch + within
        return range(first, first + self.micro_batch)

    def __iter__(self):
        while True:
            rows = [self.example_at(g) for g in self.global_indices(self.position)]
            self.position += 1
            yield _collate(self.examples, rows, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"examples_before": self.examples_before, "position": self.position,
                "global_batch": self.global_batch, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        state = _checked_state(state)
        layout = (state["global_batch"], state["grad_accum"])
        if state["position"] and layout != (self.global_batch, self.grad_accum):
            raise DataError(f"the fine-tuning data position in the checkpoint counts micro-batches of a global batch "
                            f"of {layout[0]} in {layout[1]} micro-steps, this run has {self.global_batch} in "
                            f"{self.grad_accum}; continue at another layout through redeal_sft_state")
        self.examples_before, self.position = state["examples_before"], state["position"]


def _checked_state(state: object) -> dict:
    """A saved SFTBatches state, every field checked: a checkpoint may come from anywhere."""
    if not isinstance(state, dict) or sorted(state) != sorted(STATE_KEYS):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise DataError(f"the fine-tuning data state in the checkpoint is damaged (keys {str(keys)[:80]}, expected "
                        f"{list(STATE_KEYS)})")
    for key in STATE_KEYS:
        value, low = state[key], 1 if key in ("global_batch", "grad_accum") else 0
        if type(value) is not int or not low <= value <= MAX_STATE_VALUE:
            raise DataError(f"the fine-tuning data state in the checkpoint is damaged ({key}={value!r:.40} is not an "
                            f"integer in [{low}, 2**62])")
    return dict(state)


def redeal_sft_state(states: list[dict], step: int) -> dict:
    """The SFTBatches state, for any new micro_batch / dp_size / grad_accum, of a run whose
    len(states) DP ranks saved `states` at optimizer step `step`: the new run continues with
    exactly the examples the old one would have taken next, step by step."""
    if not isinstance(states, list) or not states:
        raise DataError("the checkpoint holds no fine-tuning data state to continue from")
    checked = [_checked_state(s) for s in states]
    if any(s != checked[0] for s in checked[1:]):
        raise DataError(f"the DP ranks' fine-tuning data states in the checkpoint disagree ({checked[0]} vs "
                        f"{next(s for s in checked if s != checked[0])}); the checkpoint is damaged")
    state = checked[0]
    # Each micro-step of every DP rank takes global_batch / grad_accum examples. A micro-batch
    # whose loss was not finite is replaced by the next one (runtime.base), so a run may have
    # taken more micro-steps than its steps x grad_accum, never fewer.
    if type(step) is not int or state["position"] < step * state["grad_accum"] and state["examples_before"] == 0:
        raise DataError(f"the fine-tuning data state counts {state['position']} micro-batches, fewer than the "
                        f"checkpoint's step {step!r:.20} needs; the checkpoint is damaged")
    per_micro_step = state["global_batch"] // state["grad_accum"]
    return {**state, "examples_before": state["examples_before"] + state["position"] * per_micro_step, "position": 0}


def validation_batches_sft(examples: SFTExamples, seq_len: int, pad_id: int, micro_batch: int,
                           count: int) -> list[tuple]:
    """`count` micro-batches of the examples in file order, wrapping around when there are fewer."""
    if count == 0:  # no evaluation asked for: a folder without a validation split is fine
        return []
    _positive(seq_len=seq_len, micro_batch=micro_batch, count=count)
    if len(examples) == 0:
        raise DataError("the validation split holds no examples; prepare the folder with --val-input or "
                        "--val-fraction")
    _check_fits(examples, seq_len)
    n = len(examples)
    return [_collate(examples, [(b * micro_batch + k) % n for k in range(micro_batch)], seq_len, pad_id)
            for b in range(count)]


def answer_examples(examples: SFTExamples, n: int) -> list[tuple[list[int], str]]:
    """(prompt token ids, reference answer) of the first n examples, for exact-match evaluation."""
    return [(examples.ids(i)[:examples.prompt_tokens[i]].tolist(), examples.answers[i])
            for i in range(min(n, len(examples)))]


def chat_prompt_ids(tokenizer: TextTokenizer, question: str, template: str = "auto") -> list[int]:
    """The tokens a fine-tuned model answers `question` after: the conversation [user: question]
    rendered as for training, up to where the assistant's answer starts."""
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": "."}]
    example = tokenize_conversations([conversation], tokenizer, choose_template(tokenizer, template))[0]
    return example.ids[:example.prompt_tokens].tolist()
