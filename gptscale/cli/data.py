"""`gptscale data train-tokenizer / prepare / prepare-sft / inspect`: data, before any training."""
from __future__ import annotations

import argparse

from gptscale.cli.options import non_negative_int, positive_int


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from gptscale.data.sources import ReadOptions, read_documents
    from gptscale.data.tokenizer import train_tokenizer

    options = ReadOptions(text_field=args.text_field, txt_mode=args.txt_mode, on_bad=args.on_bad)
    texts = (doc.text for doc in read_documents(args.input, options))
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"tokenizer: {tok.vocab_size} tokens (eos id {tok.eos_id}) -> {args.out}/tokenizer.json "
          f"(sha256 {tok.sha256[:16]}...)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptscale.data.prepare import parse_size, prepare
    from gptscale.data.sources import ReadOptions

    options = ReadOptions(text_field=args.text_field, txt_mode=args.txt_mode, on_bad=args.on_bad)
    manifest = prepare(args.input, args.tokenizer, args.out, shard_bytes=parse_size(args.shard_size),
                       val_fraction=args.val_fraction, workers=args.workers, options=options,
                       overwrite=args.overwrite, progress=not args.quiet, val_chunk=args.val_chunk)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shards")
    if manifest["skipped"]:
        print(f"skipped (--on-bad skip): {manifest['skipped']}")
    print(f"manifest: {args.out}/manifest.json")
    return 0


def cmd_prepare_sft(args: argparse.Namespace) -> int:
    from gptscale.data.prepare import parse_size
    from gptscale.data.sft import prepare_sft, summary

    manifest = prepare_sft(args.input, args.tokenizer, args.out, seq_len=args.seq_len, val_inputs=args.val_input,
                           val_fraction=args.val_fraction, template=args.template,
                           shard_bytes=parse_size(args.shard_size), overwrite=args.overwrite, seed=args.seed,
                           progress=not args.quiet)
    print(summary(manifest, args.out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from gptscale.data.inspect import describe

    print(describe(args.folder, args.tokenizer, args.tokens))
    return 0


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="SPEC",
                   help="files, folders or globs (.txt .jsonl .json [.gz .zst] .parquet), a datasets save_to_disk "
                        "folder, hf:BUILDER:FILES (datasets.load_dataset on local files), or the embedded corpus "
                        "builtin:pydoc / builtin:stdlib / builtin:python")
    p.add_argument("--text-field", default="text", help="JSON / Parquet / datasets field holding the text (default text)")
    p.add_argument("--txt-mode", default="file", choices=("file", "line", "paragraph"),
                   help="what one document is in a .txt file (default: the whole file)")
    p.add_argument("--on-bad", default="error", choices=("error", "skip"),
                   help="bad records (empty, no text field, invalid JSON): stop with an error naming the file "
                        "and line (default), or skip them, counted, with a warning")


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="tokenizer, shards, inspection",
                          description="Prepare pretraining data: train a tokenizer offline, tokenize inputs into "
                                      "webdataset tar shards with a manifest, inspect the result.")
    dsub = data.add_subparsers(dest="data_command", metavar="data-command", required=True)

    p = dsub.add_parser("train-tokenizer", help="train a byte-level BPE on local files",
                        description="Train a byte-level BPE (tokenizers library) on local inputs and save "
                                    "tokenizer.json in Hugging Face's format, with <|bos|>, <|eos|>, <|pad|>.")
    _add_read_options(p)
    p.add_argument("--vocab-size", type=positive_int, required=True, help="vocabulary size including the special tokens")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_train_tokenizer)

    p = dsub.add_parser("prepare", help="tokenize inputs into webdataset shards",
                        description="Tokenize inputs in parallel into train/val webdataset tar shards (one .npy of "
                                    "token ids + .json metadata per document) and a manifest. Deterministic: the same "
                                    "input gives byte-identical shards. The tokenizer is copied into OUT/tokenizer.")
    _add_read_options(p)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (ours or a Hugging Face one)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", default="64MB", help="approximate size of one shard (default 64MB)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation, chosen by a hash of their name (default 0.01)")
    p.add_argument("--val-chunk", type=non_negative_int, default=0, metavar="TOKENS",
                   help="hold out chunks of this many tokens instead of whole documents: --val-fraction of every "
                        "document's chunks, chosen by a hash of name and index, so validation has the corpus' mix "
                        "(default 0: whole documents)")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    _add_prepare_sft(dsub)

    p = dsub.add_parser("inspect", help="counts and a decoded sample of a prepared folder")
    p.add_argument("folder", help="folder written by 'gptscale data prepare'")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the copy inside FOLDER); must match the manifest")
    p.add_argument("--tokens", type=positive_int, default=200, help="how many tokens of the sample to decode")
    p.set_defaults(func=cmd_inspect)


SFT_DESCRIPTION = """\
Tokenize chat records (JSON lines) for supervised fine-tuning into train/val webdataset tar
shards: per example KEY.npy (token ids), KEY.mask.npy (uint8 loss mask: 1 on what the model
learns) and KEY.json (prompt_tokens, answer, source, line), and a manifest with kind "sft".
Deterministic: the same input gives byte-identical shards. The tokenizer is copied into
OUT/tokenizer. OUT is written in full or not at all.

records, one per line:
  {"prompt": "...", "response": "..."}
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (last: assistant)
a prompt/response record is the messages record [user: prompt, assistant: response].

default template ([BOS] and [EOS] are the tokenizer's special tokens, not text):
  [BOS]                          if the tokenizer has one          not learned
  System: CONTENT\\n              each system message               not learned
  User: CONTENT\\n                each user message                 not learned
  Assistant:<space>              each assistant message            not learned
  CONTENT[EOS]                   its content and end of turn       learned
  e.g. <|bos|>User: 2+2?\\nAssistant: 4<|eos|>User: 3+3?\\nAssistant: 6<|eos|>
--template auto uses the tokenizer's chat_template (tokenizer_config.json) when it has one:
rendered in a jinja sandbox; for each assistant message the text between the conversation
before it (add_generation_prompt=True) and the conversation through it is learned.

A record that cannot work (invalid JSON, no response, last message not the assistant's, a
prompt of --seq-len tokens or more) stops with one line naming the file and line; longer
examples are cut to --seq-len + 1 tokens and counted.
"""


def _add_prepare_sft(dsub) -> None:
    from gptscale.cli.options import non_negative_int

    p = dsub.add_parser("prepare-sft", help="tokenize chat records into fine-tuning shards with loss masks",
                        description=SFT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="extend", nargs="+", required=True, metavar="JSONL",
                   help="JSON lines files of records (.gz / .zst too); repeat or list several")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (ours or a Hugging Face one)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty, unless "
                                                "--overwrite)")
    p.add_argument("--seq-len", type=positive_int, required=True,
                   help="training sequence length (data.seq_len): examples keep at most --seq-len + 1 tokens")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-input", action="extend", nargs="+", default=[], metavar="JSONL",
                     help="JSON lines files held out for validation")
    val.add_argument("--val-fraction", type=float, default=None,
                     help="fraction of --input records held out for validation, chosen by a hash of --seed and "
                          "the record (default: none)")
    p.add_argument("--template", default="auto", choices=("auto", "default", "tokenizer"),
                   help="auto: the tokenizer's chat_template if it has one, else the default (above); default; "
                        "tokenizer: require the chat_template")
    p.add_argument("--shard-size", default="64MB", help="approximate size of one shard (default 64MB)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --val-fraction choice (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_sft)
