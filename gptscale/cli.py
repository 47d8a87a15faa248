"""`gptscale <command>`: parse the command line, load the config, call one function."""
from __future__ import annotations

import argparse
import sys

from gptscale.config import ConfigError
from gptscale.data.errors import DataError
from gptscale.engine.launch_env import LaunchError

DESCRIPTION = """\
gptscale trains GPT models with DeepSpeed: tensor parallel (TP) x pipeline (PP) x
ZeRO-3 data parallel (DP), on one CPU box or many GPU nodes.

commands available in this version:
  presets    list the built-in model shapes with exact parameter counts and FLOPs/token
  info       resolve a run config and show its parameters, per-TP-rank size and rank layout
  selftest   check TP=N against the dense model on N local CPU ranks (gloo)
  data       train a tokenizer, prepare webdataset token shards, inspect them
  train      pretrain under DeepSpeed ZeRO-3 with tensor parallelism (run it under a launcher)
  generate   sample text from a training checkpoint
  plot       draw a run's loss curves to RUN/loss.png
"""


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_presets(args: argparse.Namespace) -> int:
    from gptscale.model.counting import count_parameters, flops_per_token
    from gptscale.presets import preset, preset_names

    print(f"{'preset':<12}{'family':<7}{'layers':>7}{'d_model':>8}{'heads':>7}{'kv':>5}{'ffn':>7}"
          f"{'vocab':>8}{'context':>8}{'params':>10}{'GFLOP/token':>13}")
    for name in preset_names():
        c = preset(name)
        print(f"{name:<12}{c.family:<7}{c.n_layer:>7}{c.n_embd:>8}{c.n_head:>7}{c.n_kv_head:>5}{c.ffn_hidden:>7}"
              f"{c.vocab_size:>8}{c.block_size:>8}{_human(count_parameters(c).total):>10}"
              f"{flops_per_token(c) / 1e9:>13.3f}")
    print("GFLOP/token: training (forward + backward) at the full context, 6N + 12*L*H*Q*T.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    import yaml

    from gptscale import config
    from gptscale.model.counting import count_parameters
    from gptscale.model.gpt import GPT
    from gptscale.parallel.topology import RankLayout, TPGroup

    cfg = config.load(args.config, args.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    m, tp = cfg.model, cfg.parallel.tp
    counts = count_parameters(m)
    print(f"\nparameters: {counts.total:,} ({_human(counts.total)})")
    for part in ("embedding", "positional", "blocks", "final_norm", "head"):
        print(f"  {part:<11}{getattr(counts, part):>20,}")
    with torch.device("meta"):  # shapes only: any size fits
        shard = GPT(m, TPGroup(group=None, rank=0, size=tp))
    per_rank = sum(p.numel() for p in shard.parameters())
    print(f"per TP rank at tp={tp}: {per_rank:,} (vocabulary padded to {m.padded_vocab_size(tp):,})")
    if args.world_size:
        layout = RankLayout.for_world(args.world_size, cfg.parallel)
        print(f"\nrank layout for {args.world_size} ranks: {dataclasses.asdict(layout)} (TP fastest)")
        for axis in ("tp", "dp", "pp"):
            print(f"  {axis} groups: {layout.groups(axis)}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from gptscale.testing.selftest import run_selftest

    return 0 if run_selftest(args.ranks, timeout=args.timeout) else 1


def cmd_train(args: argparse.Namespace) -> int:
    from gptscale import config
    from gptscale.engine.trainer import train

    result = train(config.load(args.config, args.set), resume=args.resume)
    return 0 if result.steps_done > 0 or result.stopped_by_signal else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from gptscale.engine.sampling import generate_from_checkpoint

    print(generate_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                   tokenizer=args.tokenizer))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptscale.plot import plot_run

    print(plot_run(args.run_dir))
    return 0


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


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (see configs/); omitted: the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.preset=llama-7b --set parallel.tp=8")


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


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="tokenizer, shards, inspection",
                          description="Prepare pretraining data: train a tokenizer offline, tokenize inputs into "
                                      "webdataset tar shards with a manifest, inspect the result.")
    dsub = data.add_subparsers(dest="data_command", metavar="data-command", required=True)

    p = dsub.add_parser("train-tokenizer", help="train a byte-level BPE on local files",
                        description="Train a byte-level BPE (tokenizers library) on local inputs and save "
                                    "tokenizer.json in Hugging Face's format, with <|bos|>, <|eos|>, <|pad|>.")
    _add_read_options(p)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including the special tokens")
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
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = dsub.add_parser("inspect", help="counts and a decoded sample of a prepared folder")
    p.add_argument("folder", help="folder written by 'gptscale data prepare'")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the copy inside FOLDER); must match the manifest")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens of the sample to decode")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptscale", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the
    # environment says the same, and that is what gptscale reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("presets", help="list the built-in model shapes")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="resolve a config and show sizes and rank layout",
                       description="Resolve a run config (YAML + overrides) and print it with its exact "
                                   "parameter count, the parameters each TP rank holds, and the rank layout.")
    _add_config_options(p)
    p.add_argument("--world-size", type=int, help="also print the TP/DP/PP groups for this many ranks")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("selftest", help="TP=N vs dense on N local CPU ranks",
                       description="Spawn N CPU ranks (gloo), build the tiny GPT-2 and Llama presets with "
                                   "TP=N from the same weights as the dense model, and compare logits, loss, "
                                   "every gradient and generation. Exits 1 if any rank differs by more than 1e-5.")
    p.add_argument("--ranks", type=int, default=2, help="number of local ranks = TP degree (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    p.set_defaults(func=cmd_selftest)

    _add_data_commands(sub)

    p = sub.add_parser("train", help="pretrain with DeepSpeed ZeRO-3 x tensor parallelism",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain the configured GPT under DeepSpeed ZeRO-3 (TP x DP). Run it under "
                                   "any launcher; ranks are discovered from its environment:\n"
                                   "  torchrun --nproc_per_node 2 -m gptscale.cli train --config configs/tiny.yaml\n"
                                   "  deepspeed --num_gpus 8 -m gptscale.cli train --config ...\n"
                                   "  mpirun -np 2 gptscale train --config ...\n"
                                   "Writes metrics.jsonl, TensorBoard events and checkpoints to train.out_dir. "
                                   "SIGTERM / SIGUSR1 save a checkpoint and exit 0.")
    _add_config_options(p)
    p.add_argument("--resume", default="auto",
                   help="auto (default): continue from the newest complete checkpoint in train.out_dir if there "
                        "is one; none: start fresh; or a checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a training checkpoint",
                       description="Consolidate a ZeRO-3 checkpoint (any TP degree) in this process and continue "
                                   "a prompt. The tokenizer is the training data's, unless --tokenizer is given.")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/stepNNNNNNNN")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one of the training data)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="loss curves of a run as a PNG")
    p.add_argument("run_dir", help="a train.out_dir with metrics.jsonl")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, LaunchError, FileNotFoundError) as err:
        print(f"gptscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
