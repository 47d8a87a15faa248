"""Preemption and failure as clusters deliver them, through real launchers: SIGTERM to every
process of the job (loader workers included) and a rank SIGKILLed under torchrun's own
restarts. Either way the run ends where an uninterrupted one would have, loss for loss."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.cluster import REPO, process_tree, wait_until

pytestmark = pytest.mark.launch
STEPS = 24  # long enough that a signal sent after step 3 arrives before the end


def _config(tmp_path, shards, name, **train):
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    config.write_text(f"""\
model: {{preset: tiny, vocab_size: 512, n_layer: 2, n_embd: 64, block_size: 64, dropout: 0.1}}
data: {{path: {shards}, seq_len: 32, num_workers: 1}}
train: {{out_dir: {run_dir}, steps: {STEPS}, micro_batch: 2, eval_every: 0, eval_batches: 1, progress: false,
        tensorboard: false, sample_tokens: 0, warmup_steps: 2{extra}}}
""")
    return config, run_dir


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
            "-m", "gptscale.cli", "train"]


def _losses(run_dir):
    """step -> loss from metrics.jsonl; a step logged by two attempts must agree exactly."""
    losses = {}
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "loss" in record:
            assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record
    return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, launch_env):
    tmp_path = tmp_path_factory.mktemp("reference")
    config, run_dir = _config(tmp_path, shards, "reference")
    done = subprocess.run([*_torchrun(), "--config", str(config)], env=launch_env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return _losses(run_dir)


def test_sigterm_to_the_whole_torchrun_job_saves_and_resumes_exactly(tmp_path, shards, launch_env, uninterrupted):
    """What SLURM and Kubernetes do: SIGTERM to the launcher, the ranks and their loader workers."""
    config, run_dir = _config(tmp_path, shards, "term")
    job = subprocess.Popen([*_torchrun(), "--config", str(config)], env=launch_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "three steps")
        job_processes = process_tree(job.pid)
        assert len(job_processes) >= 5  # torchrun, 2 ranks, their loader workers (in sessions of their own)
        for pid in job_processes:
            os.kill(pid, signal.SIGTERM)
        output = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert "stop signal: saved step" in output, output[-4000:]
    stopped_at = int(output.split("stop signal: saved step ")[1].split()[0])
    assert 3 <= stopped_at < STEPS
    done = subprocess.run([*_torchrun(), "--config", str(config)], env=launch_env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0 and f"resumed from {run_dir}/checkpoints/step{stopped_at:08d}" in done.stdout, \
        done.stdout[-3000:] + done.stderr[-3000:]
    assert _losses(run_dir) == uninterrupted  # bitwise, with dropout on and loader workers


def test_a_rank_killed_under_torchrun_restarts_resumes_exactly(tmp_path, shards, launch_env, uninterrupted):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed after step 7 (checkpoints every 3 steps);
    the restarted group resumes from step 6 by itself and finishes."""
    config, run_dir = _config(tmp_path, shards, "restart", save_every=3)
    started = time.monotonic()
    done = subprocess.run([*_torchrun("--max-restarts", "1"), "--config", str(config)],
                          env={**launch_env, "GPTSCALE_FAULT": "kill_at_step:7:1"}, capture_output=True, text=True,
                          timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step00000006" in done.stdout, done.stdout[-3000:]
    assert _losses(run_dir) == uninterrupted
    assert time.monotonic() - started < 300  # no rank waited out a timeout


def test_sigterm_to_a_whole_slurm_job_saves_and_resumes_exactly(tmp_path, shards, launch_env, slurm, uninterrupted):
    """srun mode, one rank per emulated node: `scancel --signal=TERM` signals every process of
    the job's steps: both ranks and their loader workers. (With --full, srun itself is signalled
    too, and srun turns a SIGTERM of its own into SIGKILL for the step: graceful preemption under
    SLURM goes through SIGUSR1 to the batch script, tested in test_torchrun_slurm.py.)"""
    config, run_dir = _config(tmp_path, shards, "slurm_term")
    env = {**launch_env, "SLURM_LAUNCH": "srun"}

    def sbatch(out):
        return slurm.submit(["--config", config], out, env)

    def finished(job):
        return slurm.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    job = sbatch(tmp_path / "first.out")
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "three steps")
    assert slurm.slurm("scancel", "--signal=TERM", job).returncode == 0
    wait_until(lambda: finished(job), 120, "the signalled job to end")
    output = (tmp_path / "first.out").read_text()
    assert "stop signal: saved step" in output, output[-4000:]
    stopped_at = int(output.split("stop signal: saved step ")[1].split()[0])
    assert stopped_at < STEPS
    job = sbatch(tmp_path / "second.out")
    wait_until(lambda: finished(job), 180, "the resumed job")
    assert slurm.job_state(job) == "COMPLETED", (tmp_path / "second.out").read_text()[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step{stopped_at:08d}" in (tmp_path / "second.out").read_text()
    assert _losses(run_dir) == uninterrupted
