"""`gptscale train`, `generate`, `plot`: a training run, and what comes out of it."""
from __future__ import annotations

import argparse

from gptscale import modes
from gptscale.cli.options import add_config_options, non_negative_float, non_negative_int, positive_int
from gptscale.config import TrainConfig


def _run(args: argparse.Namespace, task_name: str) -> int:
    from gptscale import config
    from gptscale.train import tasks
    from gptscale.train.loop import train

    cfg = config.load(args.config, args.set)
    result = train(cfg, resume=args.resume, task=getattr(tasks, task_name)(cfg), overwrite_run=args.overwrite_run)
    return 0 if result.steps_done > 0 or result.stopped_by_signal else 1


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, "Pretraining")


def cmd_finetune(args: argparse.Namespace) -> int:
    return _run(args, "FineTuning")


def cmd_generate(args: argparse.Namespace) -> int:
    from gptscale.train.sample import generate_from_checkpoint

    print(generate_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                   tokenizer=args.tokenizer, adapter=args.adapter, chat=args.chat))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptscale.plot import plot_run

    print(plot_run(args.run_dir))
    return 0


def _modes_help() -> str:
    return "\n".join(f"  {spec.name:<11} {spec.summary}" for spec in map(modes.by_name, modes.names()[1:]))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument("--resume", default="auto",
                   help="auto (default): continue from the newest complete checkpoint in train.out_dir if there "
                        "is one; none: start fresh (refused where checkpoints exist, see --overwrite-run); or a "
                        "checkpoint folder")
    p.add_argument("--overwrite-run", action="store_true",
                   help="start afresh (implies --resume none), deleting the checkpoints, metrics and TensorBoard "
                        "events train.out_dir already holds")


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="pretrain with tensor, pipeline and ZeRO data parallelism",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain the configured GPT with DeepSpeed in the run mode parallel.mode picks "
                                   "(auto: zero3 without pipeline stages, else pipe):\n" + _modes_help() + "\n"
                                   "Run it under any launcher; ranks are discovered from its environment:\n"
                                   "  torchrun --nproc_per_node 2 -m gptscale.cli train --config configs/tiny.yaml\n"
                                   "  deepspeed --num_gpus 8 -m gptscale.cli train --config ...\n"
                                   "  mpirun -np 2 gptscale train --config ...\n"
                                   "Writes metrics.jsonl, TensorBoard events and checkpoints to train.out_dir. "
                                   "Once training runs, SIGTERM / SIGUSR1 make every rank finish the step, save and "
                                   "exit 0 (during start-up they end the process at once; no checkpoint is saved "
                                   "while steps are non-finite).")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="supervised fine-tuning (full or LoRA) from a trained model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune train.init_from (a gptscale checkpoint of any layout, a canonical folder "
                                   "or a Hugging Face folder) on prompt/response examples from 'gptscale data "
                                   "prepare-sft' (data.path). The loss covers the responses only, averaged over the "
                                   "labelled tokens of each whole step.\n"
                                   "  finetune.method: full   every weight trains\n"
                                   "  finetune.method: lora   low-rank adapters on finetune.lora.targets train, the base "
                                   "is frozen (no optimizer state);\n"
                                   "                          each checkpoint holds the adapters alone in adapter/ "
                                   "('gptscale convert to-hf --adapter' makes a PEFT folder of them)\n"
                                   "Any run mode (" + ", ".join(modes.names()[1:]) + "), any launcher, the same "
                                   "checkpoints, resume and stop signals as 'gptscale train'. At the end, "
                                   "finetune.eval_answers held-out prompts are answered greedily and scored by exact "
                                   "match.\n"
                                   "  torchrun --nproc_per_node 2 -m gptscale.cli finetune --config configs/sft.yaml")
    _add_run_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="sample text from a checkpoint, canonical or Hugging Face folder",
                       description="Load a training checkpoint (any run mode, any TP x PP x DP layout), a canonical "
                                   "folder ('gptscale convert consolidate / from-hf') or a local Hugging Face GPT-2 / "
                                   "Llama folder in this process and continue a prompt. The tokenizer is the one "
                                   "saved with the weights, unless --tokenizer is given.")
    p.add_argument("--checkpoint", required=True,
                   help="RUN/checkpoints/stepNNNNNNNN, a canonical folder or a Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=TrainConfig.sample_temperature, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=TrainConfig.sample_top_k)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one of the training data)")
    p.add_argument("--adapter", help="LoRA adapters to apply: an adapter folder or a LoRA run's checkpoint")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message to a fine-tuned model: render it with the fine-tuning "
                        "template ('gptscale data prepare-sft'; the tokenizer's chat_template if it has one) and "
                        "print the answer alone, up to the end-of-turn token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="loss curves of a run as a PNG")
    p.add_argument("run_dir", help="a train.out_dir with metrics.jsonl")
    p.set_defaults(func=cmd_plot)
