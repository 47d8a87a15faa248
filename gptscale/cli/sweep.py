"""`gptscale sweep`: a grid of model sizes x token budgets, each a normal training run, and the
scaling-law fit of their final losses."""
from __future__ import annotations

import argparse
import sys

from gptscale.errors import UserError

DESCRIPTION = """\
Train a grid of model sizes x token budgets, one normal training run each, and fit their final
validation losses to L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's approach 3: Huber loss on
log L, L-BFGS from a grid of starts; Hoffmann et al. 2022, Besiroglu et al. 2024).

Each run is `torchrun --standalone --nproc_per_node K -m gptscale.cli train --config BASE --set ...`
with its own train.out_dir (OUT/runs/NAME, log in OUT/logs/NAME.log) and --resume auto: a stopped
sweep continues where it was, and a run whose metrics hold a validation loss at its last step is
skipped. Prints one line per run, then the fitted parameters with bootstrap intervals and the
compute-optimal N and D (C = 6 N D) for the budget.

Writes OUT/sweep.json and three PNGs: loss_curves.png (validation loss per run),
loss_vs_compute.png (final loss vs C with the measured frontier and the fit's compute-optimal
line) and fit.png (fitted vs measured).

The sweep config (see configs/sweep-tiny.yaml):
  base: configs/tiny.yaml           run config every run starts from
  set: ["train.eval_every=25"]      overrides for every run (--set syntax)
  sizes: [{n_layer: 1, n_embd: 32, n_head: 2}, ...]   model overrides per size (optional name:)
  tokens: [100000, 200000, ...]     training tokens per run; steps = tokens / tokens per step,
                                    rounded to the nearest step (at least 1)
  out_dir: runs/sweep
  launcher: {nproc: 2}              ranks per run
  fit: {parameters: non_embedding, budget: 1.0e+15, bootstrap: 200, level: 0.9, seed: 0, enabled: true}
       parameters: non_embedding (default; Kaplan et al. 2020) or total
       budget: FLOPs for the compute-optimal answer (default: 10x the largest run's compute)

  gptscale sweep --config configs/sweep-tiny.yaml --dry-run    the commands, nothing run
  gptscale sweep --config configs/sweep-tiny.yaml              train what is missing, fit, plot
  gptscale sweep --config configs/sweep-tiny.yaml --fit-only --budget 1e18
"""


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of FLOPs")
    return value


def cmd_sweep(args: argparse.Namespace) -> int:
    from gptscale.scaling import sweep as sweeps

    sweep = sweeps.load_sweep(args.config)
    try:
        failed = sweeps.run_all(sweep, dry_run=args.dry_run) if not args.fit_only else []
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run in progress was told to save and stop
        print("gptscale sweep: stopped; the run in progress saved a checkpoint where it could: the same command "
              "continues the sweep", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    records = sweeps.collect(sweep)
    result, note = None, None
    if sweep.fit.enabled or args.fit_only:
        try:
            result = sweeps.fit_results(sweep, records, args.budget)
        except UserError as err:
            if args.fit_only or not failed:
                raise
            note = f"no fit: {err}"
    from gptscale.scaling.sweep_plot import plot_sweep

    out = sweeps.write_results(sweep, records, result, note)
    plots = plot_sweep(sweep, records, result)
    if result:
        print(sweeps.summary(result))
    if note:
        print(note)
    print(f"results: {out}; plots: {', '.join(str(p) for p in plots)}")
    if failed:
        print(f"gptscale sweep: {len(failed)} run(s) failed: {', '.join(failed)} (their logs are in "
              f"{sweep.out_dir / 'logs'}); run the sweep again to retry them")
        return 1
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of sizes x token budgets and fit L(N, D)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION)
    p.add_argument("--config", required=True, metavar="SWEEP.yaml", help="the sweep config")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print each run's command and size; run nothing")
    mode.add_argument("--fit-only", action="store_true",
                      help="train nothing: fit and plot the runs that are done")
    p.add_argument("--budget", type=positive_float, metavar="FLOPS",
                   help="compute budget for the compute-optimal N and D (overrides fit.budget)")
    p.set_defaults(func=cmd_sweep)
