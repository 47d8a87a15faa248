"""`gptscale data train-tokenizer / prepare / inspect`: pretraining data, before any training."""
from __future__ import annotations

import argparse

from gptscale.cli.options import positive_int


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
                       overwrite=args.overwrite, progress=not args.quiet)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shards")
    if manifest["skipped"]:
        print(f"skipped (--on-bad skip): {manifest['skipped']}")
    print(f"manifest: {args.out}/manifest.json")
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
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = dsub.add_parser("inspect", help="counts and a decoded sample of a prepared folder")
    p.add_argument("folder", help="folder written by 'gptscale data prepare'")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the copy inside FOLDER); must match the manifest")
    p.add_argument("--tokens", type=positive_int, default=200, help="how many tokens of the sample to decode")
    p.set_defaults(func=cmd_inspect)
