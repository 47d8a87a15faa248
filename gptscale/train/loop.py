"""`gptscale train`: the training loop, the same for every run mode and task.

Works under any launcher (gptscale.launch). The loop owns the cadence (log, evaluate, save),
the policy for non-finite losses, preemption signals, checkpoints and auto-resume, metrics,
the progress bar and the closing sample. It reaches the run mode only through the runtime
interface (`gptscale.runtime.base`, the mode chosen by the registry in `gptscale.modes`) and
the task only through `gptscale.train.tasks`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from gptscale import faults, modes
from gptscale.atomic import write_text_atomic
from gptscale.checkpoint.canonical import TRAINER_STATE, is_canonical
from gptscale.checkpoint.layout import CheckpointMeta, Layout
from gptscale.checkpoint.resume import (RunCheckpoints, agree, attempt, check_shared_folder, clear_run_folder,
                                        find_resume, refuse_used_run_folder)
from gptscale.config import RunConfig
from gptscale.ds_import import import_deepspeed, on_gpu
from gptscale.errors import CheckpointError, ConfigError, NonFiniteError, UserError
from gptscale.launch import check_gpu_present, check_tp_within_node, init_distributed
from gptscale.model.counting import count_parameters, flops_per_token
from gptscale.parallel.primitives import comm_device
from gptscale.parallel.topology import Topology
from gptscale.runtime.base import RuntimeContext, rng_state, runtime_class, seed_all, set_rng_state
from gptscale.ds_templates import load_template
from gptscale.runtime.ds_config import assemble
from gptscale.scaling.hardware import device_peak_tflops
from gptscale.train.job import JobDir
from gptscale.train.metrics import MetricsLogger, peak_memory_gb
from gptscale.train.answers import exact_match
from gptscale.train.sample import LARGEST_SAMPLED_MODEL, load_dense_model, sample_from_checkpoint, sample_live
from gptscale.train.tasks import Pretraining, Task


@dataclass
class TrainResult:
    steps_done: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean training loss
    val_losses: dict[int, float] = field(default_factory=dict)
    stopped_by_signal: bool = False
    sample: str | None = None
    exact_match: float | None = None  # fine-tuning: held-out greedy answers equal to the reference
    exact_match_before: float | None = None  # the same before training (a fresh run)


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) set a flag; ranks agree on it at each step end
    (`agree_step_end`, together with whether the step was bad).

    Armed when training begins. During start-up (rendezvous, building, resuming) the signals
    keep their default action and end the process at once: there is nothing to save, the
    last checkpoint stays intact, and a rank blocked in a collective stops too (a Python
    handler would only run once the blocking call returned)."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True


def agree_step_end(bad: bool, stop: bool) -> tuple[bool, bool]:
    """(was the step bad on any rank, did any rank get a stop signal): both in one all-reduce,
    the loop's only per-step collective besides the mode's own (each is a host sync on a GPU)."""
    flags = torch.tensor([float(bad), float(stop)], device=comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_anywhere, stop_anywhere = flags.tolist()
    return bool(bad_anywhere), bool(stop_anywhere)


class NonFinitePolicy:
    """Counts non-finite losses and gradient norms; `train.max_nonfinite` in a row stop the run
    with the newest good checkpoint named, and no checkpoint is saved while a streak is open
    (so keep-K never rotates good ones out for broken ones). A mode that can skip a micro-batch
    (zero3) reports each one; otherwise the step is counted. Whether a step was bad is agreed
    by all ranks (they must agree on saving it)."""

    def __init__(self, max_in_a_row: int, checkpoints: RunCheckpoints):
        self.max_in_a_row, self.checkpoints = max_in_a_row, checkpoints
        self.streak, self.total = 0, 0
        self.exceeded: str | None = None  # the step and kind that ended the run, once it is over

    def finite(self) -> None:
        self.streak = 0

    def nonfinite(self, step: int, what: str) -> None:
        """A bad micro-batch (raises at once when there are too many: the step would never end)."""
        self._count(step, what)
        self.stop_if_exceeded()

    def _count(self, step: int, what: str) -> None:
        self.streak += 1
        self.total += 1
        if self.streak >= self.max_in_a_row:
            self.exceeded = f"{self.streak} consecutive {what} had a non-finite loss or gradient norm at step {step}"

    @staticmethod
    def bad_step(loss: float, grad_norm: float | None, skipped: bool) -> bool:
        """Was the step just taken bad on this rank: its loss, its gradient norm, or DeepSpeed
        skipped the optimizer step (its own check found non-finite gradients)."""
        return skipped or not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))

    def after_step(self, bad_anywhere: bool, step: int) -> None:
        """Count the step by the ranks' agreed verdict (every rank alike)."""
        if bad_anywhere:
            self._count(step, "steps")
        else:
            self.finite()

    def stop_if_exceeded(self) -> None:
        if self.exceeded:
            newest = self.checkpoints.complete()[-1:]
            raise NonFiniteError(f"{self.exceeded}; lower train.lr, raise train.warmup_steps or check the data; the "
                                 f"newest good checkpoint is {newest[0] if newest else 'none'}")

    @property
    def open(self) -> bool:
        return self.streak > 0


def _quiet_libraries() -> None:
    """DeepSpeed logs every step at INFO and torch warns about deprecated collectives that
    DeepSpeed calls; neither is actionable for a user of gptscale."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class Trainer:
    """resume: auto (the newest checkpoint of train.out_dir, if any), none (a fresh run; refused
    in a folder holding checkpoints unless overwrite_run, which deletes them) or a checkpoint."""

    def __init__(self, cfg: RunConfig, resume: str = "auto", task: Task | None = None, overwrite_run: bool = False):
        cfg = _with_absolute_paths(cfg)  # config.yaml and checkpoints name the data and base wherever they are read
        self.cfg = cfg
        mode = modes.resolve(cfg.parallel.mode, cfg.parallel.pp)
        template = load_template(cfg)  # a wrong DeepSpeed template fails before any rank waits for another
        check_gpu_present(torch.cuda.is_available())  # before DeepSpeed settles for its CPU accelerator
        deepspeed = import_deepspeed()
        _quiet_libraries()
        launch = init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the group started above
        self.topo = Topology.from_env(cfg.parallel)
        check_tp_within_node(cfg.parallel.tp, launch, dist.get_backend())
        self.rank = dist.get_rank()
        self.is_writer = self.rank == 0
        self.run_dir = Path(cfg.train.out_dir)
        grid = self.topo.layout
        if overwrite_run:
            resume = "none"
        if not launch.one_node:
            check_shared_folder(self.run_dir)
        self.resume_from = self._agreed_resume(resume)
        layout = Layout(mode=mode.name, tp=grid.tp, pp=grid.pp, dp=grid.dp,
                        virtual_stages=cfg.parallel.virtual_stages)
        self.task = task or Pretraining(cfg)
        if self.task.starts_from_weights and self.resume_from is None and not cfg.train.init_from:
            raise ConfigError(f"{self.task.name} starts from a trained model: set train.init_from to a checkpoint, a "
                              f"canonical folder or a Hugging Face folder")
        # A checkpoint of another layout, or a fresh pretraining run from a canonical folder with
        # optimizer state: the weights come in as init_from, Adam's state and the position after.
        # (A task that starts from a trained model takes only its weights.)
        self.continue_from = continued_run(self.resume_from, layout,
                                           None if self.task.starts_from_weights else cfg.train.init_from)
        if resume == "none":
            self._start_fresh(overwrite_run)
        tokenizer = self.task.tokenizer
        self.checkpoints = RunCheckpoints(self.run_dir, cfg, layout, run_id=self._run_id(), tokenizer_file=tokenizer and tokenizer.path,
                                          tokenizer_sha256=tokenizer and tokenizer.sha256)
        self.ds_config = assemble(cfg, grid.dp, on_gpu(), template)
        context = RuntimeContext(cfg=cfg, mode=mode, topo=self.topo, ds_config=self.ds_config, deepspeed=deepspeed,
                                 trains=self.task.trains, init_from=self._starting_weights(),
                                 mean_over_step_tokens=self.task.mean_over_step_tokens)
        runtime = runtime_class(mode.name)
        if self.is_writer:
            print(f"gptscale train: {launch.describe()}", flush=True)
            print(f"gptscale train: {grid.world_size} rank(s) = tp {grid.tp} x pp {grid.pp} x dp {grid.dp}, "
                  f"{self.task.name}, "
                  f"{runtime.describe(cfg, self.ds_config)}, {cfg.train.precision}, run dir {self.run_dir}",
                  flush=True)
        self.runtime = runtime(context)

    def _starting_weights(self) -> str | None:
        """Where the model's weights come from before DeepSpeed's own files (if any) are loaded:
        a checkpoint of another layout (a LoRA run's: its adapters, and its base from its
        train.init_from); for a LoRA run resumed, train.init_from (its checkpoints hold the
        adapters alone, the frozen base never changes); else train.init_from for a fresh run."""
        if self.continue_from is not None:
            return str(self.continue_from)
        if self.resume_from is not None:
            return self.cfg.train.init_from if self.cfg.lora is not None else None
        return self.cfg.train.init_from

    def _agreed_resume(self, resume: str) -> Path | None:
        """Rank 0 chooses the checkpoint and tells the others: under NFS caching (or a folder that
        is not shared) ranks listing it themselves could pick different steps."""
        found: list = [None, None]
        if self.is_writer:
            try:
                path = find_resume(self.run_dir, resume)
                found = [str(path) if path else None, None]
            except UserError as err:
                found = [None, str(err)]
        dist.broadcast_object_list(found, src=0)
        if found[1]:
            raise CheckpointError(found[1])
        return Path(found[0]) if found[0] else None

    def _start_fresh(self, overwrite_run: bool) -> None:
        if self.is_writer:
            error = attempt(lambda: clear_run_folder(self.run_dir) if overwrite_run
                            else refuse_used_run_folder(self.run_dir))
        agree(error if self.is_writer else None, f"starting a fresh run in {self.run_dir}")

    def _run_id(self) -> str:
        """The resumed checkpoint's run id (a checkpoint from this run folder), or a new one from
        rank 0; it names staging folders and is recorded in COMPLETE.json."""
        ours = self.resume_from is not None and self.resume_from.resolve().parent == (self.run_dir / "checkpoints").resolve()
        found = [CheckpointMeta.read(self.resume_from).run_id if ours else ""]
        if not found[0]:
            found = [uuid.uuid4().hex if self.is_writer else None]
            dist.broadcast_object_list(found, src=0)
        return found[0]

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t, runtime = self.cfg, self.cfg.train, self.runtime
        batches = self.task.train_batches(self.topo.coords.dp, self.topo.layout.dp)
        held_out = self.task.validation_batches(self.topo.coords.dp, self.topo.layout.dp)
        step, resumed = 0, None
        if self.resume_from is not None or self.continue_from is not None:
            if self.continue_from is not None:
                resumed = self.checkpoints.load_resharded(
                    self.continue_from,
                    lambda states, step: self.task.redeal(states, step, self.topo.coords.dp, self.topo.layout.dp),
                    runtime.load_resharded)
            else:
                resumed = self.checkpoints.load(self.resume_from, runtime.load_native)
            step = resumed.step
            runtime.follow_schedule(step)
            batches.load_state_dict(resumed.data)
            if self.is_writer:
                print(f"resumed from {self.continue_from or self.resume_from} at step {step}", flush=True)
                if resumed.changes:
                    print(f"gptscale train: resuming with changed settings: {'; '.join(resumed.changes)}", flush=True)
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_text_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))

        peak, peak_source = device_peak_tflops(t.peak_tflops)
        flops_token = flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_step = t.micro_batch * t.grad_accum * self.topo.layout.dp * cfg.data.seq_len
        metrics = MetricsLogger(self.run_dir, self.is_writer, t.tensorboard, t.wandb, cfg.to_dict())
        if self.is_writer:
            print(f"{tokens_per_step:,} tokens/step, {flops_token / 1e6:.2f} MFLOP/token; MFU against "
                  f"{peak:.3f} TFLOP/s per device ({peak_source})", flush=True)
        result = TrainResult(steps_done=step)
        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_writer and t.progress), file=sys.stderr)
        iterator = iter(batches)
        nonfinite = NonFinitePolicy(t.max_nonfinite, self.checkpoints)
        job = JobDir(self.is_writer)
        if step == 0 and t.eval_every:  # the baseline the validation curve falls from
            result.val_losses[0] = self._evaluate(held_out, 0, metrics, bar, "(before training)")
        answers = self.task.answer_examples()
        if step == 0 and answers:  # the score fine-tuning starts from
            result.exact_match_before = self.score_answers(answers, 0, metrics, cfg.train.init_from)
        if resumed is not None and resumed.rng is None:  # another layout: no rank's RNG to continue
            seed_all(cfg.train.seed + 1000 * self.topo.coords.dp + 1 + 7919 * step)
        elif resumed is not None:
            # Last, right before the first step: the set-up above draws from the generators (the
            # CPU peak measurement, the loaders' seeds), which the saved state already went past.
            set_rng_state(resumed.rng)
        runtime.train()
        self.stop = StopRequest()
        loop_started = time.perf_counter()  # wall_s: everything the loop does, for tokens / wall time
        while step < t.steps:
            start = time.perf_counter()
            skipped_before = runtime.skipped_steps()
            loss_value = runtime.train_step(iterator, step, nonfinite)
            grad_norm, skipped = runtime.grad_norm(), runtime.skipped_steps() > skipped_before
            # A signal that lands after this point is seen at the next step's end.
            bad, signalled = agree_step_end(nonfinite.bad_step(loss_value, grad_norm, skipped), self.stop.flag)
            nonfinite.after_step(bad, step + 1)
            step += 1
            elapsed = time.perf_counter() - start
            result.losses[step] = loss_value
            tokens_per_s = tokens_per_step / elapsed
            tflops = flops_token * tokens_per_s / self.topo.layout.world_size / 1e12
            if step % t.log_every == 0 or step == t.steps:
                metrics.log({"step": step, "loss": loss_value, "lr": runtime.lr(), "grad_norm": grad_norm,
                             "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
                             "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
                             "peak_mem_gb": peak_memory_gb(), "nonfinite_skipped": nonfinite.total,
                             "optimizer_step_skipped": skipped, "step_time_s": elapsed,
                             "wall_s": time.perf_counter() - loop_started, **runtime.step_metrics()})
            nonfinite.stop_if_exceeded()  # after the step is logged
            job.step_took(elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            faults.after_step(step, self.rank)
            # A stop signal leaves only the preemption lead: the save comes first, a due eval is skipped.
            if ((t.eval_every and step % t.eval_every == 0) or step == t.steps) and not signalled:
                result.val_losses[step] = self._evaluate(held_out, step, metrics, bar)
            saved = None
            if (t.save_every and step % t.save_every == 0) or step == t.steps or signalled:
                if nonfinite.open:
                    if self.is_writer:
                        newest = self.checkpoints.complete()[-1:]
                        bar.write(f"not saving step {step}: the last {nonfinite.streak} step(s) were non-finite; the "
                                  f"newest good checkpoint is {newest[0] if newest else 'none'}")
                else:
                    saved = self.save(step, batches, job, metrics, rotate=not signalled)
            if signalled:
                result.stopped_by_signal = True
                if saved:
                    job.stopped(step, saved)
                if self.is_writer:
                    bar.write(f"stop signal: saved step {step} and exiting" if saved else
                              f"stop signal: exiting without saving step {step} (non-finite steps)")
                break
        bar.close()
        result.steps_done = step
        if not result.stopped_by_signal and t.sample_tokens and self.task.tokenizer is not None:
            result.sample = self.sample()
            if self.is_writer:
                print(f"sample ({t.sample_tokens} tokens after {t.sample_prompt!r}):\n{result.sample}", flush=True)
        if not result.stopped_by_signal and answers:
            final = self.checkpoints.complete()[-1:]  # this step's, unless non-finite steps kept it from saving
            saved = final[0] if final and CheckpointMeta.read(final[0]).step == step else None
            result.exact_match = self.score_answers(answers, step, metrics, saved)
        metrics.close()
        return result

    def _evaluate(self, held_out, step: int, metrics: MetricsLogger, bar, note: str | None = None) -> float:
        val = self.runtime.evaluate(held_out)
        ppl = math.exp(min(val, 50))
        metrics.log({"step": step, "val_loss": val, "val_ppl": ppl})
        if self.is_writer:
            bar.write(f"step {step}: val loss {val:.4f} {note or f'(ppl {ppl:.1f})'}")
        return val

    def save(self, step: int, batches, job: JobDir, metrics: MetricsLogger, rotate: bool = True) -> Path:
        """Save `step`; its measured duration sets the preemption lead the batch script keeps."""
        def write_files(ckpt: Path) -> None:
            self.runtime.save_native(ckpt, step)
            self.task.save_extras(ckpt, self.runtime)

        started = time.perf_counter()
        path = self.checkpoints.save(step, batches.state_dict(), rng_state(), write_files, rotate=rotate)
        took = time.perf_counter() - started
        lead = job.save_took(took)
        metrics.log({"step": step, "save_time_s": took, "preempt_lead_s": lead})
        if self.is_writer and os.environ.get("GPTSCALE_QUIET_SAVE") is None:
            tqdm.write(f"checkpoint: {path} (saved in {took:.1f} s; preemption lead {lead} s)", file=sys.stderr)
        return path

    def score_answers(self, answers: list[tuple[list[int], str]], step: int, metrics: MetricsLogger,
                      weights: str | Path | None) -> float | None:
        """Exact match of greedy answers to held-out prompts, from the live model where the mode
        allows, else on rank 0 from `weights` (the model's current weights as files: the final
        checkpoint, or init_from before training); the same value on every rank, or None (and a
        note) where it cannot be scored: the model is too large to load on one rank, or there
        are no such files. A failure on rank 0 reaches every rank (none is left waiting)."""
        tokenizer, budget = self.task.tokenizer, self.cfg.finetune.answer_tokens
        model = self.runtime.generation_model()
        found: list = [None, None]  # score, why not
        if model is not None:
            found[0], rows = exact_match(model, answers, tokenizer, budget, self.runtime.engine.device)
        elif self.is_writer:
            found, rows = self._score_from_files(answers, weights)
        dist.broadcast_object_list(found, src=0)
        if found[1] is not None:
            if self.is_writer:
                print(f"step {step}: exact match not scored: {found[1]}", flush=True)
            return None
        metrics.log({"step": step, "val_exact_match": found[0]})
        if self.is_writer:
            print(f"step {step}: exact match on {len(rows)} held-out prompts {found[0]:.1%}", flush=True)
            for prompt, reference, answer in rows[:3]:
                shown = prompt if len(prompt) <= 60 else "..." + prompt[-57:]
                print(f"  {shown!r} -> {answer!r} (reference {reference!r})", flush=True)
        return found[0]

    def _score_from_files(self, answers, weights) -> tuple[list, list]:
        """([score, None], rows) or ([None, why not], []) on rank 0, from a model loaded whole."""
        if weights is None or not Path(weights).is_dir():
            return [None, f"no checkpoint or folder to load the model from ({weights})"], []
        if count_parameters(self.cfg.model).total > LARGEST_SAMPLED_MODEL:
            return [None, f"the model is too large to load on one rank; run gptscale generate --chat on {weights}"], []
        try:
            model = load_dense_model(weights, tokenizer=str(Path(self.task.tokenizer.path).parent))[1]
            score, rows = exact_match(model, answers, self.task.tokenizer, self.cfg.finetune.answer_tokens,
                                      torch.device("cpu"))
            return [score, None], rows
        except UserError as err:
            return [None, str(err)], []

    def sample(self) -> str | None:
        """The closing sample, on rank 0 (None elsewhere when only rank 0 generates)."""
        model = self.runtime.generation_model()
        if model is not None:
            return sample_live(model, self.task.tokenizer, self.cfg, self.runtime.engine.device)
        final = self.checkpoints.complete()[-1:]
        if not self.is_writer:
            return None
        return sample_from_checkpoint(final[0], self.cfg) if final else "(no checkpoint to sample from)"


def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The data folder and the starting weights by absolute path: config.yaml and checkpoints
    name them wherever they are read (a LoRA checkpoint finds its base through init_from)."""
    if cfg.data.path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    if cfg.train.init_from:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(Path(cfg.train.init_from).resolve())))
    return cfg


def continued_run(resume_from: Path | None, layout: Layout, init_from: str | None) -> Path | None:
    """What a run continues at another layout from: the checkpoint it resumes if that was saved
    at another layout, or (a fresh run) train.init_from if that is a canonical folder holding
    optimizer state. None: a plain resume or start."""
    if resume_from is not None:
        return resume_from if CheckpointMeta.read(resume_from).layout != layout else None
    if init_from and (Path(init_from) / TRAINER_STATE).is_file() and is_canonical(Path(init_from)):
        return Path(init_from)
    return None


def train(cfg: RunConfig, resume: str = "auto", task: Task | None = None, overwrite_run: bool = False) -> TrainResult:
    return Trainer(cfg, resume, task, overwrite_run).run()
