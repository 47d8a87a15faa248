"""`gptscale sweep`: a grid of model sizes x token budgets, each a normal, resumable training run,
and the scaling-law fit of their final validation losses (`gptscale.scaling.fit`).

A sweep config (YAML, strict like the run config; paths are relative to the working folder,
as data.path and train.out_dir are):

    base: configs/tiny.yaml          # the run config every run starts from
    set: ["train.eval_every=25"]     # overrides for every run, as `--set` takes them
    sizes:                           # model overrides, one mapping per size
      - {n_layer: 1, n_embd: 32, n_head: 2}
      - {n_layer: 2, n_embd: 64, n_head: 4, name: small}   # name: the run folders' prefix
    tokens: [100000, 200000]         # training tokens per run
    out_dir: runs/sweep
    launcher: {nproc: 2}             # ranks per run (torchrun --nproc_per_node)
    fit: {parameters: non_embedding, budget: 1.0e+15, bootstrap: 200, level: 0.9, seed: 0}

Each run is `python -m torch.distributed.run --standalone --nproc_per_node K -m gptscale.cli train
--config BASE --set ... --set train.out_dir=OUT/runs/NAME --set train.steps=S --resume auto`, so it
is exactly a training run of its own, continued from its newest checkpoint if it was stopped, and
skipped once its metrics.jsonl holds a validation loss at its last step. Its log is OUT/logs/NAME.log.

Steps: S = tokens / (micro_batch * grad_accum * seq_len * dp) rounded to the nearest whole step (at
least 1); D is the tokens the run trains, S times that (printed, and in sweep.json).

N (fit.parameters): `non_embedding` (default) counts the transformer blocks and the final norm,
leaving out the token and position embeddings and the output head (every vocabulary-sized matrix),
as Kaplan et al. 2020 (section 2.1, figure 6) found the loss of small models follows non-embedding
parameters far more closely; `total` counts every parameter (what Hoffmann et al. 2022 fit). Compute
is C = 6 N D with that N, as the compute-optimal allocation assumes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptscale import config as run_config
from gptscale.errors import ConfigError, DataError, UserError
from gptscale.model.counting import count_parameters
from gptscale.safe_yaml import load_yaml_file
from gptscale.typed import from_dict

PARAMETER_COUNTS = ("non_embedding", "total")
SHORT = {"n_layer": "L", "n_embd": "d", "n_head": "h", "n_kv_head": "kv", "ffn_hidden": "f"}
MAX_RUNS = 1000


@dataclass(frozen=True)
class LauncherConfig:
    """How each run is started: `nproc` ranks on this machine (torchrun --standalone)."""

    nproc: int = 1

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"launcher.nproc={self.nproc} must be >= 1 (ranks per run)")


@dataclass(frozen=True)
class FitConfig:
    """The fit of the final losses. parameters: which N (module docstring); budget: FLOPs for the
    compute-optimal N and D (None: 10x the largest run's compute); bootstrap: resamples for the
    intervals at `level` (0: none); enabled: false trains and plots the curves only."""

    enabled: bool = True
    parameters: str = "non_embedding"
    budget: float | None = None
    bootstrap: int = 200
    level: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parameters not in PARAMETER_COUNTS:
            raise ConfigError(f"fit.parameters={self.parameters!r} is unknown; choose one of "
                              f"{', '.join(PARAMETER_COUNTS)}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ConfigError(f"fit.budget={self.budget} must be a positive number of FLOPs (e.g. 1.0e+18) or null")
        if not 0 <= self.bootstrap <= 10_000:
            raise ConfigError(f"fit.bootstrap={self.bootstrap} must be in [0, 10000] resamples")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"fit.level={self.level} must be in (0, 1), e.g. 0.9 for 5th-95th percentiles")
        if self.seed < 0:
            raise ConfigError(f"fit.seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class _Scalars:
    """The sweep config's fields that typed.from_dict checks (sizes, tokens and set by hand)."""

    base: str = ""
    out_dir: str = ""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass(frozen=True)
class Run:
    name: str
    size: str
    requested_tokens: int
    steps: int
    tokens_per_step: int
    params_total: int
    params_non_embedding: int
    overrides: tuple[str, ...]  # --set values after the sweep's own

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


@dataclass(frozen=True)
class Sweep:
    path: str
    base: str
    out_dir: Path
    launcher: LauncherConfig
    fit: FitConfig
    runs: tuple[Run, ...]

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "runs" / run.name

    def log_path(self, run: Run) -> Path:
        return self.out_dir / "logs" / f"{run.name}.log"

    def command(self, run: Run) -> list[str]:
        sets = [*run.overrides, f"train.out_dir={self.run_dir(run)}", f"train.steps={run.steps}"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(self.launcher.nproc), "-m", "gptscale.cli", "train", "--config", self.base,
                *[arg for s in sets for arg in ("--set", s)], "--resume", "auto"]

    def n_of(self, run: Run) -> int:
        return run.params_total if self.fit.parameters == "total" else run.params_non_embedding


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep config; every run's config is resolved here, so a bad size or
    budget is reported before anything trains."""
    where = f"sweep config {str(path)!r}"
    data = load_yaml_file(path, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping (base, sizes, tokens, out_dir, ...)")
    data = dict(data)
    sizes = _list(data.pop("sizes", None), "sizes", where, "a list of model overrides, e.g. "
                  "[{n_layer: 2, n_embd: 64, n_head: 4}]")
    tokens = _list(data.pop("tokens", None), "tokens", where, "a list of training token counts, e.g. [100000, 400000]")
    common = _list(data.pop("set", []), "set", where, "a list of 'section.key=value' overrides", empty_ok=True)
    try:
        scalars = from_dict(_Scalars, data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    for name in ("base", "out_dir"):
        if not getattr(scalars, name).strip():
            raise ConfigError(f"{where}: {name} is missing; set it to "
                              f"{'the run config every run starts from' if name == 'base' else 'the sweep folder'}")
    if not Path(scalars.base).is_file():
        raise ConfigError(f"{where}: base={scalars.base!r} does not exist; name a run config such as configs/tiny.yaml")
    for i, item in enumerate(common):
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{where}: set[{i}]={item!r} is not a 'section.key=value' string")
        if item.split("=", 1)[0].strip() in ("train.out_dir", "train.steps"):
            raise ConfigError(f"{where}: set[{i}]={item!r}: the sweep sets {item.split('=', 1)[0].strip()} of each "
                              f"run itself (out_dir and tokens); remove it")
    for i, value in enumerate(tokens):
        if not (_number(value) and value >= 1):
            raise ConfigError(f"{where}: tokens[{i}]={value!r} must be a positive number of training tokens")
    if len({int(t) for t in tokens}) != len(tokens):  # int(t) names the run folder
        raise ConfigError(f"{where}: tokens={tokens} lists a budget twice; give each once")
    size_overrides, names = [], []
    for i, size in enumerate(sizes):
        if not isinstance(size, dict) or not size:
            raise ConfigError(f"{where}: sizes[{i}]={size!r} must be a mapping of model fields, "
                              f"e.g. {{n_layer: 2, n_embd: 64, n_head: 4}}")
        size = dict(size)
        for key, value in size.items():
            if not isinstance(value, (int, float, str, bool)) and not (key == "name" and value is None):
                raise ConfigError(f"{where}: sizes[{i}].{key}={value!r} must be a single value (a model field's)")
        name = size.pop("name", None) or "-".join(f"{SHORT.get(k, k)}{v}" for k, v in size.items())
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"{where}: sizes[{i}].name={name!r} must be letters, digits, '-', '_' or '.'")
        if name in names:
            raise ConfigError(f"{where}: sizes[{i}] is named {name!r} like an earlier size; give it another name")
        names.append(name)
        size_overrides.append([f"model.{k}={json.dumps(v)}" for k, v in size.items()])
    if len(sizes) * len(tokens) > MAX_RUNS:
        raise ConfigError(f"{where}: {len(sizes)} sizes x {len(tokens)} token budgets is more than {MAX_RUNS} runs")
    if scalars.fit.enabled and (len(sizes) < 2 or len(tokens) < 2 or len(sizes) * len(tokens) < 5):
        raise ConfigError(f"{where}: {len(sizes)} size(s) x {len(tokens)} token budget(s) = {len(sizes) * len(tokens)} "
                          f"run(s); the fit of L(N, D) (5 parameters) needs at least 2 sizes, 2 budgets and 5 runs: "
                          f"add some, or set fit.enabled: false")

    runs = []
    for i, (name, model_sets) in enumerate(zip(names, size_overrides)):
        for budget in tokens:
            overrides = (*common, *model_sets)
            try:
                cfg = run_config.load(scalars.base, overrides)
                dp = cfg.parallel.resolve_dp(scalars.launcher.nproc)
            except ConfigError as err:
                raise ConfigError(f"{where}: sizes[{i}] ({name}) with base {scalars.base}: {err}") from None
            per_step = cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len * dp
            steps = max(1, round(budget / per_step))
            count = count_parameters(cfg.model)
            runs.append(Run(name=f"{name}-D{int(budget)}", size=name, requested_tokens=int(budget), steps=steps,
                            tokens_per_step=per_step, params_total=count.total,
                            params_non_embedding=count.blocks + count.final_norm, overrides=overrides))
    return Sweep(path=str(path), base=scalars.base, out_dir=Path(scalars.out_dir), launcher=scalars.launcher,
                 fit=scalars.fit, runs=tuple(runs))


def _list(value: Any, key: str, where: str, what: str, empty_ok: bool = False) -> list:
    if value is None or not isinstance(value, list) or (not value and not empty_ok):
        raise ConfigError(f"{where}: {key} must be {what}; got {value!r}")
    return value


# -- runs ---------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl; a damaged line (a run killed mid-write) is passed over."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and _number(record.get("step")):
            records.append(record)
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validation_curve(sweep: Sweep, run: Run) -> list[tuple[int, float]]:
    """(tokens, val_loss) of a run, the newest record for a step winning (a resumed run repeats steps)."""
    by_step = {}
    for record in read_metrics(sweep.run_dir(run) / "metrics.jsonl"):
        if "val_loss" in record and record["step"] <= run.steps:
            by_step[int(record["step"])] = record["val_loss"]
    return [(step * run.tokens_per_step, value) for step, value in sorted(by_step.items())]


def final_loss(sweep: Sweep, run: Run) -> float | None:
    """The validation loss at the run's last step (None: not done); may be NaN/inf for a diverged run."""
    curve = dict(validation_curve(sweep, run))
    value = curve.get(run.tokens)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_all(sweep: Sweep, *, dry_run: bool = False, echo=print) -> list[str]:
    """Train every run not done yet, one after the other; one progress line per run. Returns the
    names of runs that failed (the others may still be fitted). A run that stops with a user error
    (exit code 2: its config or data) stops the sweep, as every other run would stop the same way."""
    failed = []
    total = len(sweep.runs)
    for i, run in enumerate(sweep.runs, start=1):
        head = f"[{i}/{total}] {run.name}"
        what = f"N={sweep.n_of(run):,} ({sweep.fit.parameters}), D={run.tokens:,} tokens, {run.steps} steps"
        if dry_run:
            echo(f"{head}: {what}\n  {_shell(sweep.command(run))}")
            continue
        done = final_loss(sweep, run)
        if done is not None:
            echo(f"{head}: skipped, done (val loss {done:.4f})")
            continue
        log = sweep.log_path(run)
        log.parent.mkdir(parents=True, exist_ok=True)
        echo(f"{head}: started, {what} (log {log})")
        started = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows progress as it happens
        with open(log, "ab") as out:
            out.write(f"$ {_shell(sweep.command(run))}\n".encode())
            out.flush()
            code = _train(sweep.command(run), out, env)
        seconds = time.monotonic() - started
        value = final_loss(sweep, run)
        if code == 0 and value is not None:
            echo(f"{head}: done, val loss {value:.4f} in {seconds:.0f} s")
            continue
        error = _user_error(log)
        if error:  # a rank's one-line error: its config or data, the same for every run
            raise UserError(f"sweep run {run.name} stopped: {error} (log {log})")
        reason = f"exit code {code}" if code else "stopped before its last step (a stop signal?)"
        echo(f"{head}: FAILED after {seconds:.0f} s: {reason}; run the sweep again to continue it (log {log})")
        failed.append(run.name)
    return failed


def _shell(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


def _train(command: list[str], out, env: dict[str, str]) -> int:
    """Run one training command to its end. Interrupted (Ctrl-C, or SIGTERM to the sweep), the run
    gets SIGTERM too: its ranks save a checkpoint and stop, and the next sweep continues from it."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # torchrun passes SIGTERM on to its ranks
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _user_error(log: Path) -> str | None:
    """The last `gptscale: error: ...` line a rank printed in this attempt of the run, if any."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    attempt = text.rsplit("\n$ ", 1)[-1]  # each attempt starts with its command line
    errors = [line.split("gptscale: error: ", 1)[1].strip() for line in attempt.splitlines()
              if "gptscale: error: " in line]
    return errors[-1][:500] if errors else None


# -- results --------------------------------------------------------------------------------------
def collect(sweep: Sweep) -> list[dict]:
    """One record per run: its N (both counts), D, C = 6 N D and final validation loss (None: not done)."""
    records = []
    for run in sweep.runs:
        n = sweep.n_of(run)
        records.append({"name": run.name, "size": run.size, "steps": run.steps, "tokens": run.tokens,
                        "requested_tokens": run.requested_tokens, "params_total": run.params_total,
                        "params_non_embedding": run.params_non_embedding, "N": n, "D": run.tokens,
                        "C": 6.0 * n * run.tokens, "final_val_loss": final_loss(sweep, run),
                        "run_dir": str(sweep.run_dir(run))})
    return records


def fit_results(sweep: Sweep, records: list[dict], budget: float | None = None) -> dict:
    """Fit L(N, D) to the finished runs; the compute-optimal N and D for `budget` FLOPs (default:
    fit.budget, else 10x the largest run's compute). Raises DataError when too few runs are done."""
    from gptscale.scaling.fit import (
        fit_scaling_law,
        optimum_intervals,
        poorly_constrained,
    )

    done = [r for r in records if r["final_val_loss"] is not None]
    if not done:
        raise DataError(f"no run of {sweep.path} is done yet ({sweep.out_dir}/runs); run the sweep first")
    skipped = [f"{r['name']}: final val loss {r['final_val_loss']} is not finite; left out of the fit"
               for r in done if not math.isfinite(r["final_val_loss"])]
    done = [r for r in done if math.isfinite(r["final_val_loss"])]
    cfg = sweep.fit
    fit = fit_scaling_law([r["N"] for r in done], [r["D"] for r in done], [r["final_val_loss"] for r in done],
                          bootstrap=cfg.bootstrap, level=cfg.level, seed=cfg.seed)
    flops = budget or cfg.budget or 10.0 * max(r["C"] for r in done)
    n_opt, d_opt = fit.law.compute_optimal(flops)
    return {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "parameters": fit.law.as_dict(),
        "intervals": {k: list(v) for k, v in fit.intervals.items()},
        "poorly_constrained": poorly_constrained(fit.intervals),
        "level": fit.level,
        "bootstrap": cfg.bootstrap,
        "N_counts": cfg.parameters,
        "points": fit.points,
        "skipped": skipped,
        "huber_objective": fit.objective,
        "budget": {"flops": flops, "source": "--budget" if budget else "fit.budget" if cfg.budget else
                   "10x the largest run's compute",
                   "N_opt": n_opt, "D_opt": d_opt,
                   "loss": float(fit.law.loss(n_opt, d_opt)) if math.isfinite(n_opt) else None,
                   "intervals": {k: list(v) for k, v in optimum_intervals(fit, flops).items()}},
    }


def summary(result: dict) -> str:
    """The fit as a few lines of text."""
    if "parameters" not in result:
        return ""
    p, iv, level = result["parameters"], result["intervals"], result["level"]
    counts = result["N_counts"].replace("_", "-")
    head = (f"fit of {result['points']} runs: {result['law']}  (N = {counts} parameters, D = tokens; Huber "
            f"objective {result['huber_objective']:.3g})")
    lines = [head]
    for name in ("E", "A", "B", "alpha", "beta"):
        interval = f"  [{_g(iv[name][0])}, {_g(iv[name][1])}]" if name in iv else ""
        lines.append(f"  {name:<5} = {_g(p[name])}{interval}")
    if iv:
        lines.append(f"  (intervals: {level:.0%} bootstrap percentiles over {result['bootstrap']} resamples of the "
                     f"runs)")
    for note in result["skipped"]:
        lines.append(f"  note: {note}")
    loose = result.get("poorly_constrained") or []
    if loose:
        lines.append(f"  warning: {', '.join(loose)} {'is' if len(loose) == 1 else 'are'} not pinned down by these runs "
                     f"(bootstrap interval wider than 10x, or 0.5 for an exponent): the runs do not separate the "
                     f"terms of the law, so do not trust it or the compute-optimal answer below; train longer "
                     f"(nearer convergence) or over a wider range of sizes")
    b = result["budget"]
    biv = b["intervals"]
    if b["loss"] is None:
        lines.append(f"compute-optimal at C = {b['flops']:.3g} FLOPs: none (alpha or beta <= 0)")
    else:
        n_iv = f" [{_g(biv['N_opt'][0])}, {_g(biv['N_opt'][1])}]" if biv else ""
        d_iv = f" [{_g(biv['D_opt'][0])}, {_g(biv['D_opt'][1])}]" if biv else ""
        lines.append(f"compute-optimal at C = {b['flops']:.3g} FLOPs ({b['source']}; C = 6 N D): N = {_g(b['N_opt'])}"
                     f"{n_iv} parameters, D = {_g(b['D_opt'])}{d_iv} tokens ({b['D_opt'] / b['N_opt']:.1f} tokens per "
                     f"parameter), predicted loss {b['loss']:.4f}")
    return "\n".join(lines)


def _g(value: float) -> str:
    return f"{value:.4g}"


def write_results(sweep: Sweep, records: list[dict], fit: dict | None, note: str | None = None) -> Path:
    from gptscale.atomic import write_text_atomic

    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    out = sweep.out_dir / "sweep.json"
    payload = {"config": sweep.path, "base": sweep.base, "launcher": {"nproc": sweep.launcher.nproc},
               "runs": records, "fit": fit, "fit_note": note}
    write_text_atomic(out, json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")
    return out


def _finite(value):
    """NaN and infinities as null: sweep.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
