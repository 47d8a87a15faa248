"""Pipeline bubble: the measured idle fraction of each stage vs 1F1B's theory, plain and
interleaved (pipe_zero3 with parallel.virtual_stages = v).

Trains with `parallel.pp` stages (one rank per stage; 2 stages fit this 2-core machine
without oversubscription) for m in {1, 2, 4, 8} micro-batches per step, and reads the
per-stage idle fraction the trainer logs (`pipe_idle_fraction` in metrics.jsonl: 1 -
forward/backward time / pipeline time, from timers around DeepSpeed's instructions in pipe
mode, around the schedule's ops in pipe_zero3). Theory for equal stages: idle share
(p-1)/(m+p-1), i.e. a bubble of (p-1)/m of the useful work; interleaved over v chunks
(p-1)/v / (m + (p-1)/v), a bubble of (p-1)/(v·m). Prints both, and their ratio.

    .venv/bin/python bench/pipeline_bubble.py [--mode pipe_zero3 --virtual 1 2] [--stages 2] [--steps 6]
        [--layers 4 --embd 256] [--micro-batches 4 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from gptscale import config
from gptscale.scaling.bubble import theoretical_idle_fraction
from gptscale.testing.distributed import run_ranks


def _train(overrides: list[str]) -> None:
    from gptscale.train.loop import train

    train(config.load(None, overrides), resume="none")


def measure(stages: int, micro_batches: int, steps: int, model: list[str], root: Path, mode: str = "pipe",
            virtual: int = 1) -> tuple[list[float], float]:
    """(each stage's median idle fraction, the median step time in seconds)."""
    out = root / f"{mode}-m{micro_batches}-v{virtual}"
    overrides = [*model, f"parallel.pp={stages}", f"parallel.mode={mode}", f"parallel.virtual_stages={virtual}",
                 "data.synthetic=true", f"train.out_dir={out}",
                 f"train.steps={steps}", f"train.grad_accum={micro_batches}", "train.eval_every=0",
                 "train.eval_batches=1", "train.sample_tokens=0", "train.progress=false", "train.tensorboard=false"]
    run_ranks(_train, stages, overrides, timeout=1200, env={"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1",
                                                             "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["pipe_idle_fraction"] for r in rows if "pipe_idle_fraction" in r][1:]  # step 1 warms up
    step_time = statistics.median([r["step_time_s"] for r in rows if "step_time_s" in r][1:])
    return [statistics.median(step[s] for step in per_step) for s in range(stages)], step_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--mode", default="pipe", choices=["pipe", "pipe_zero3"])
    parser.add_argument("--virtual", type=int, nargs="+", default=[1],
                        help="virtual stages (model chunks per stage) to measure; above 1 needs --mode pipe_zero3")
    args = parser.parse_args()
    model = ["model.preset=tiny", "model.vocab_size=512", f"model.n_layer={args.layers}",
             f"model.n_embd={args.embd}", "model.n_head=4", "model.block_size=128", "data.seq_len=128",
             "train.micro_batch=4", "parallel.pipe_partition=blocks"]
    p = args.stages
    print(f"{args.mode}: {p} stages, {args.layers} blocks, d={args.embd}, seq 128, micro-batch 4, fp32 CPU, "
          f"median over steps 2..{args.steps}")
    print(f"{'m':>3} {'v':>2} | {'idle per stage (measured)':>27} | {'theory idle':>11} | "
          f"{'bubble/work measured':>20} | {'theory (p-1)/(vm)':>17} | ratio | step s")
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.micro_batches:
            for v in args.virtual:
                idle, step_time = measure(p, m, args.steps, model, Path(tmp), args.mode, v)
                theory = theoretical_idle_fraction(p, m, v)
                worst = max(idle)
                bubble = worst / (1 - worst)
                print(f"{m:>3} {v:>2} | {', '.join(f'{f:.3f}' for f in idle):>27} | {theory:>11.3f} | "
                      f"{bubble:>20.3f} | {(p - 1) / (v * m):>17.3f} | {worst / theory:.2f}x | {step_time:.3f}", flush=True)


if __name__ == "__main__":
    main()
