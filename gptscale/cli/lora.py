"""`gptscale lora merge`: a LoRA run's adapters folded into its base, as a canonical folder."""
from __future__ import annotations

import argparse


def cmd_merge(args: argparse.Namespace) -> int:
    from gptscale.checkpoint.merge import merge_into_canonical

    merged = merge_into_canonical(args.source, args.out, args.adapter, args.dtype)
    print(f"merged {merged} adapted layers into the base: {args.out} (a canonical folder: generate, "
          f"'convert to-hf' and train.init_from read it)")
    return 0


def add_parsers(sub) -> None:
    lora = sub.add_parser("lora", help="LoRA adapters: merge them into their base",
                          description="Work with the LoRA adapters a 'gptscale finetune' run with "
                                      "finetune.method=lora writes (every checkpoint holds them in adapter/).")
    lsub = lora.add_subparsers(dest="lora_command", metavar="lora-command", required=True)
    p = lsub.add_parser("merge", help="a LoRA checkpoint (or base + --adapter) -> canonical merged weights",
                        description="Fold W + (alpha / rank) B A into every adapted weight and write the result as a "
                                    "canonical folder (full weights, no adapters; config finetune.method=full), which "
                                    "'gptscale convert to-hf' exports as a plain transformers model. SOURCE is a LoRA "
                                    "run's checkpoint (any layout), or any base (checkpoint, canonical or Hugging Face "
                                    "folder) with --adapter.")
    p.add_argument("source", help="a LoRA run's checkpoint, or a base model with --adapter")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--adapter", help="an adapter folder (or LoRA checkpoint) to merge into SOURCE")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype (default fp32)")
    p.set_defaults(func=cmd_merge)
