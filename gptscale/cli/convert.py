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

    from gptscale.errors import ConfigError

    source = open_source(args.checkpoint)
    if args.with_optimizer and source.cfg.lora is not None:
        raise ConfigError(f"{args.checkpoint} is a LoRA run's checkpoint: --with-optimizer is for full runs (a LoRA "
                          f"run resumes from its checkpoint at any layout); its adapters export with 'gptscale "
                          f"convert to-hf --adapter'")
    state = source.trainer_state() if args.with_optimizer else None
    count = len(source.names) * (1 + (2 + (args.dtype != "fp32") if args.with_optimizer else 0))
    with _progress(count, "consolidate", args.quiet) as bar:
        write_canonical(source, args.out, args.dtype, args.with_optimizer, state, args.max_shard_size << 20, bar.update)
    print(f"canonical weights ({args.dtype}{', with optimizer state' if args.with_optimizer else ''}): {args.out}")
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    from gptscale.checkpoint.convert import open_source
    from gptscale.checkpoint.hf_folder import write_hf

    from gptscale.convert.hf import hf_shapes

    if args.adapter:
        from gptscale.checkpoint.peft_folder import write_peft

        adapter = write_peft(args.source, args.out, args.base)
        print(f"PEFT LoRA adapter (rank {adapter.lora.rank}, alpha {adapter.lora.alpha:g}, targets "
              f"{adapter.lora.targets}) for the {adapter.model.family} base: {args.out}; load it with "
              f"peft.PeftModel.from_pretrained(<the base exported by 'gptscale convert to-hf'>, '{args.out}')")
        return 0
    source = open_source(args.source)
    with _progress(len(hf_shapes(source.cfg.model)), "to-hf", args.quiet) as bar:
        write_hf(source, args.out, args.dtype, args.max_shard_size << 20, bar.update)
    if source.tokenizer_dir is None:
        print("note: the source has no tokenizer (synthetic data?); AutoTokenizer will not load this folder")
    print(f"Hugging Face {source.cfg.model.family} model ({args.dtype}): {args.out}")
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from gptscale.checkpoint.canonical import write_canonical
    from gptscale.checkpoint.hf_folder import HFFolder

    source = HFFolder(args.hf_dir)
    with _progress(len(source.names), "from-hf", args.quiet) as bar:
        write_canonical(source, args.out, args.dtype, max_shard_bytes=args.max_shard_size << 20, progress=bar.update)
    print(f"canonical weights of the {source.cfg.model.family} model ({args.dtype}): {args.out}; train from them "
          f"with --set train.init_from={args.out} and the model section of {args.out}/config.yaml")
    return 0


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype (default fp32: exact)")
    p.add_argument("--max-shard-size", type=positive_int, default=5120, metavar="MiB",
                   help="largest safetensors file (default 5120 MiB, transformers' default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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
    _add_output_options(p)
    p.add_argument("--with-optimizer", action="store_true",
                   help="also write the fp32 master weights and Adam's moments under canonical names, the step, "
                        "the layout and every rank's data position (any mode trained with a ZeRO optimizer)")
    p.set_defaults(func=cmd_consolidate)

    p = csub.add_parser("to-hf", help="a checkpoint or canonical folder -> a transformers folder",
                        description="Export to a folder that transformers' AutoModelForCausalLM / AutoTokenizer "
                                    ".from_pretrained load offline: gpt2-family models as GPT2LMHeadModel, llama-family "
                                    "as LlamaForCausalLM (fused QKV un-interleaved, GPT-2's Conv1D transposed, "
                                    "vocabulary padding dropped, every config field explicit), plus "
                                    "generation_config.json and the run's tokenizer. Logits equal gptscale's.")
    p.add_argument("source", help="a training checkpoint (RUN/checkpoints/stepNNNNNNNN) or a canonical folder; "
                                  "with --adapter a LoRA run's checkpoint or an adapter folder")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--adapter", action="store_true",
                   help="export the LoRA adapters of SOURCE as a PEFT folder (adapter_config.json + "
                        "adapter_model.safetensors, PEFT's names; the fused QKV adapter split into q/k/v for Llama, "
                        "reordered for GPT-2's c_attn) for peft.PeftModel.from_pretrained on the base that "
                        "'to-hf' exports from the same checkpoint (a LoRA checkpoint exports its base)")
    p.add_argument("--base", help="with --adapter: base_model_name_or_path to record (the exported base's folder)")
    _add_output_options(p)
    p.set_defaults(func=cmd_to_hf)

    p = csub.add_parser("from-hf", help="a local GPT-2 / Llama transformers folder -> canonical safetensors",
                        description="Import a local Hugging Face GPT2LMHeadModel or LlamaForCausalLM folder "
                                    "(config.json, safetensors weights, tokenizer) as a canonical folder that "
                                    "train.init_from, fine-tuning and generate use at any TP/PP. Other "
                                    "architectures, settings gptscale cannot compute exactly, and pickled "
                                    "pytorch_model.bin weights are refused by name.")
    p.add_argument("hf_dir", help="a local transformers model folder")
    p.add_argument("out", help="output folder (must not exist)")
    _add_output_options(p)
    p.set_defaults(func=cmd_from_hf)
