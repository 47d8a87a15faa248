"""`gptscale <command>`: parse the command line, load the config, call one function.

Each command's parser and body live in the submodule of its kind (info, data, train); this
module assembles them and turns every `UserError` into one line and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from gptscale import modes
from gptscale.cli import convert, data, info, launch_scripts, lora, scaling, sweep, train
from gptscale.cli.options import OneLineParser
from gptscale.errors import UserError

DESCRIPTION = f"""\
gptscale trains GPT models with DeepSpeed: tensor parallel (TP) x pipeline (PP) x
data parallel (DP) with ZeRO-3, on one CPU box or many GPU nodes.

commands:
  presets    list the built-in model shapes with exact parameter counts and FLOPs/token
  info       resolve a run config and show its parameters, per-TP-rank size, run mode and rank layout
  selftest   check TP=N against the dense model on N local CPU ranks (gloo)
  data       train a tokenizer, prepare webdataset token shards (pretraining or fine-tuning), inspect them
  train      pretrain in any run mode ({", ".join(modes.names()[1:])}; run it under a launcher)
  finetune   supervised fine-tuning, full or LoRA, in any run mode, from a trained model
  generate   sample text from a training checkpoint of any run mode and layout (with LoRA adapters)
  plot       draw a run's loss curves to RUN/loss.png
  convert    consolidate a checkpoint (any layout), export to / import from Hugging Face (LoRA: PEFT)
  lora       merge a LoRA run's adapters into its base
  estimate   parameters, FLOPs, memory per device, bubble and time to train on paper; --search for a layout
  sweep      a grid of model sizes x token budgets trained and fitted to L(N, D) = E + A/N^a + B/D^b
  launch-scripts  copy this install's launch scripts, example configs and DeepSpeed templates into a folder
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gptscale", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the
    # environment says the same, and that is what gptscale reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    info.add_parsers(sub)
    data.add_parsers(sub)
    train.add_parsers(sub)
    convert.add_parsers(sub)
    lora.add_parsers(sub)
    scaling.add_parsers(sub)
    sweep.add_parsers(sub)
    launch_scripts.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as err:
        print(f"gptscale: error: {err}", file=sys.stderr)
        _tell_torchrun(err)
        _tell_job_script(err)
        _wait_for_failing_peers()
        return 2


def _wait_for_failing_peers(seconds: float = 5.0) -> None:
    """A configuration or data error usually stops every rank at the same point. Each rank
    says so in the job's store and leaves once all have (or after `seconds`): the first rank
    to exit makes torchrun stop the others, and a rank stopped before it wrote its error file
    shows as `error_file: <N/A>` in torchrun's summary."""
    if not _process_group_started():
        return
    import time

    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"gptscale/failed/{dist.get_rank()}", "1")
        keys = [f"gptscale/failed/{rank}" for rank in range(world)]
        deadline = time.monotonic() + seconds
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, ValueError):
        pass  # the store is gone (rank 0 ended): nothing to wait for


def _tell_job_script(err: BaseException) -> None:
    """Under launch/slurm/ (GPTSCALE_JOB_DIR set): a configuration or data error is not a crash
    to retry; the batch script reads this file and does not requeue."""
    folder = os.environ.get("GPTSCALE_JOB_DIR")
    if folder:
        from gptscale.atomic import write_text_atomic

        try:
            write_text_atomic(os.path.join(folder, "user_error"), f"{err}\n")
        except OSError:
            pass  # the error itself is printed; this is only the script's hint


def _tell_torchrun(err: BaseException) -> None:
    """Under torchrun, a rank's error goes to its error file too, so the launcher's failure
    summary names it (`error_file:` and the message) instead of `<N/A>` among 512 ranks' logs."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)


def run() -> int:
    """`python -m gptscale.cli`: `main`, with any other exception recorded for torchrun as well
    (torch's `@record`)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        code = main()
    else:
        from torch.distributed.elastic.multiprocessing.errors import record

        code = record(main)()
    if _process_group_started():
        _exit_without_finalizing(code)
    return code


def _process_group_started() -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _exit_without_finalizing(code: int) -> None:
    """End the process once a process group was started, skipping interpreter finalization:
    gloo's worker threads may still hold tensors of asynchronous collectives (DeepSpeed does
    not wait for all of them), and a thread that releases one while the interpreter finalizes
    aborts the whole process ("terminate called without an active exception", SIGABRT after a
    clean finish or a one-line error; seen under mpirun and in CI). atexit handlers still run,
    and the standard streams are flushed; multiprocessing's children end the same way. MPI is
    finalized first where mpi4py started it (its own exit hook would not run; Open MPI's
    launcher counts a rank that ends without MPI_Finalize as failed)."""
    import atexit

    atexit._run_exitfuncs()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run())
