"""`gptscale convert consolidate / to-hf / from-hf`: checkpoints into other forms, offline,
in one process, tensor by tensor."""
from __future__ import annotations

import argparse

from gptscale.cli.options import positive_int


def _progress(total: int, what: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="tensor", disable=quiet, dynamic_ncols=True)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from gptscale.checkpoint.canonical import write_canonical
    from gptscale.checkpoint.convert import open_source

    source = open_source(args.checkpoint)
    state = source.trainer_state() if args.with_optimizer else None
    count = len(source.names) * (1 + (2 + (args.dtype != "fp32") if args.with_optimizer else 0))
    with _progress(count, "consolidate", args.quiet) as bar:
        write_canonical(source, args.out, args.dtype, args.with_optimizer, state, args.max_shard_size << 20, bar.update)
    print(f"canonical weights ({args.dtype}{', with optimizer state' if args.with_optimizer else ''}): {args.out}")
    return 0


def add_parsers(sub) -> None:
    conv = sub.add_parser("convert", help="consolidate checkpoints, export to / import from Hugging Face",
                          description="Convert checkpoints offline, in one process, tensor by tensor (memory: about "
                                      "the largest tensor, not the model). Outputs are written beside the target and "
                                      "renamed into place when complete; an existing output is refused.")
    csub = conv.add_subparsers(dest="convert_command", metavar="convert-command", required=True)

    p = csub.add_parser("consolidate", help="a training checkpoint -> canonical safetensors",
                        description="Any gptscale training checkpoint (zero3, pipe, pipe_zero3; any TP x PP x DP) -> "
                                    "the canonical form: TP-merged tensors without vocabulary padding under the dense "
                                    "model's names, in sharded safetensors with an index (as transformers writes "
                                    "them), the run config and the tokenizer. train.init_from, generate and "
                                    "'convert to-hf' read it at any layout.")
    p.add_argument("checkpoint", help="RUN/checkpoints/stepNNNNNNNN")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype (default fp32: exact)")
    p.add_argument("--with-optimizer", action="store_true",
                   help="also write the fp32 master weights and Adam's moments under canonical names, the step, "
                        "the layout and every rank's data position (zero3 and pipe_zero3 checkpoints)")
    p.add_argument("--max-shard-size", type=positive_int, default=5120, metavar="MiB",
                   help="largest safetensors file (default 5120 MiB, transformers' default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_consolidate)
