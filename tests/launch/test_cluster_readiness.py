"""What a real GPU cluster does to a job that a laptop never does, on the emulated SLURM cluster
(two nodes with 2 CPUs and 2 fake GPUs each, task/affinity binding) and real launchers: GPUs
granted but not usable, one GPU and its own CPUs per task, two jobs sharing the nodes, a node
that never starts, a time limit shorter than the run with a slow save, crashes and failed
saves against the requeue policy, an out_dir that is not shared, an older torchrun."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.cluster import REPO, REQUIRED, run, wait_until

pytestmark = pytest.mark.launch
TORCHRUN = str(REPO / "launch" / "torchrun.sh")


def _config(tmp_path, name="run", steps=3, **train):
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    config.write_text(f"""\
model: {{preset: tiny, vocab_size: 512, n_layer: 2, n_embd: 64, block_size: 64}}
data: {{synthetic: true, seq_len: 32}}
train: {{out_dir: {run_dir}, steps: {steps}, micro_batch: 2, eval_every: 0, eval_batches: 1, progress: false,
        tensorboard: false, sample_tokens: 0, warmup_steps: 1{extra}}}
""")
    return config, run_dir


def _output(out: Path) -> str:
    return out.read_text() if out.exists() else ""


def _job(slurm, tmp_path, launch_env, config, name="job", resources=None, timeout=240, launch="srun", **env):
    """Submit pretrain.sbatch for `config`, wait for it to end: (state, output, seconds it ran)."""
    out = tmp_path / f"{name}.out"
    job = slurm.submit(["--config", config], out, {**launch_env, "SLURM_LAUNCH": launch, **env},
                       **({"resources": resources} if resources else {}))
    wait_until(lambda: slurm.job_state(job) != "PENDING", 60, f"job {job} to start")
    started = time.monotonic()
    state = slurm.wait_ended(job, timeout)
    return state, _output(out), time.monotonic() - started


# -- resources and binding -------------------------------------------------------------------

def test_a_job_granted_gpus_that_torch_cannot_see_stops_at_once(slurm, tmp_path, launch_env):
    """What a CUDA-less torch (or a missing driver module) does on a GPU node: on main it trained
    on CPU, a hundred times slower, without a word."""
    config, run_dir = _config(tmp_path)
    env = {k: v for k, v in launch_env.items() if k != "DS_ACCELERATOR"}
    state, output, _ = _job(slurm, tmp_path, env, config)
    assert state == "FAILED", output[-3000:]
    assert "gptscale: error: SLURM granted 1 GPU(s) on this node (CUDA_VISIBLE_DEVICES=0) but torch" in output
    assert "not requeueing" in output and not (run_dir / "checkpoints").exists()


def test_srun_mode_gives_each_rank_one_gpu_and_its_own_cpus(slurm, tmp_path, launch_env):
    """Two ranks on one node under --gpus-per-task=1: each sees one GPU (where set_device(local
    rank) would fail for local rank 1) and is bound to its own CPU; lines carry the rank; each
    task runs through CONTAINER_EXEC."""
    config, run_dir = _config(tmp_path)
    container = tmp_path / "container"  # stands in for `apptainer exec --nv IMAGE`: notes each task, runs it
    container.write_text(f'#!/bin/bash\ntouch {tmp_path}/in-container-$SLURM_PROCID\nexec "$@"\n')
    container.chmod(0o755)
    state, output, _ = _job(slurm, tmp_path, launch_env, config, CONTAINER_EXEC=str(container),
                            resources=("-N", "1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-gpu=1"))
    assert state == "COMPLETED", output[-3000:]
    assert (tmp_path / "in-container-0").exists() and (tmp_path / "in-container-1").exists()
    placed = re.search(r"placement: rank 0 \S+ cpus (\S+) cpu \(CUDA_VISIBLE_DEVICES=(\S+)\); "
                       r"rank 1 \S+ cpus (\S+) cpu \(CUDA_VISIBLE_DEVICES=(\S+)\)", output)
    assert placed, output[-3000:]
    cpus0, gpus0, cpus1, gpus1 = placed.groups()
    assert {gpus0, gpus1} == {"0", "1"}  # one GPU each, not both GPUs for both
    assert {cpus0, cpus1} == {"0", "1"}  # one CPU each
    assert re.search(r"^0: gptscale train: slurm: rank 0 of 2", output, re.M)  # srun --label
    assert (run_dir / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()


def test_torchrun_mode_starts_one_rank_per_granted_gpu_and_warns_of_tp_across_nodes(slurm, tmp_path, launch_env):
    """Ranks per node come from SLURM's grant (2 GPUs per node here), not from counting devices
    on each node; tp=4 over nodes of 2 ranks would all-reduce across the network."""
    config, run_dir = _config(tmp_path)
    state, output, _ = _job(slurm, tmp_path, launch_env, config, launch="torchrun",
                            resources=("-N", "2", "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-gpu=1"))
    assert state == "COMPLETED", output[-3000:]
    assert "gptscale train: torchrun: rank 0 of 4, local rank 0" in output, output[-3000:]
    assert (run_dir / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()
    config.write_text(config.read_text().replace("block_size: 64}", "block_size: 64, n_head: 4}")
                      .replace("out_dir: " + str(run_dir), "out_dir: " + str(tmp_path / "tp4")) + "parallel: {tp: 4}\n")
    state, output, _ = _job(slurm, tmp_path, launch_env, config, name="tp4", launch="torchrun",
                            resources=("-N", "2", "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-gpu=1"))
    # An error with NCCL; on these CPU nodes (gloo) a warning, and the run goes on.
    assert "warning: parallel.tp=4 does not divide the 2 rank(s) on this node" in output, output[-3000:]


def test_two_jobs_run_at_once_on_the_same_nodes(slurm, tmp_path, launch_env):
    """Each job takes one GPU and one CPU of both nodes; on main both took port 29500."""
    one = ("-N", "2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-gpu=1")
    jobs = []
    for name in ("first", "second"):
        config, run_dir = _config(tmp_path, name, steps=10)
        out = tmp_path / f"{name}.out"
        jobs.append((slurm.submit(["--config", config], out, {**launch_env, "SLURM_LAUNCH": "torchrun"},
                                  resources=one), out, run_dir))
    ids = {job for job, _, _ in jobs}
    wait_until(lambda: ids <= set(slurm.slurm("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()), 90,
               "both jobs running at once")
    ports = set()
    for job, out, run_dir in jobs:
        assert slurm.wait_ended(job, 300) == "COMPLETED", _output(out)[-3000:]
        assert (run_dir / "checkpoints" / "step00000010" / "COMPLETE.json").is_file()
        ports.add(re.search(r"rank 0 at 127\.0\.0\.1:(\d+)", _output(out)).group(1))
    assert len(ports) == 2


# -- a node that never starts ----------------------------------------------------------------

def _python_that_hangs_on_node_1(tmp_path) -> str:
    """What a node whose start hangs (a stuck mount, a container pull) looks like to the others."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\n[[ "${{SLURM_NODEID:-0}}" == 1 ]] && exec sleep 600\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("launch, expected", [
    ("srun", "gptscale: error: rank 0: only 1 of 2 ranks joined within 8 s; missing rank(s) 1"),
    ("torchrun", "1/2 clients joined"),
])
def test_a_node_that_never_starts_fails_the_job_within_the_rendezvous_timeout(slurm, tmp_path, launch_env, launch,
                                                                              expected):
    config, _ = _config(tmp_path)
    state, output, seconds = _job(slurm, tmp_path, launch_env, config, launch=launch, timeout=150,
                                  PYTHON=_python_that_hangs_on_node_1(tmp_path), GPTSCALE_RENDEZVOUS_TIMEOUT="8",
                                  MAX_CRASH_RETRIES="0")
    assert state == "FAILED", output[-3000:]
    assert expected in output, output[-3000:]
    assert "not requeueing" in output
    print(f"\n{launch}: a node that never started failed the job {seconds:.0f} s after it began (rendezvous timeout 8 s)")
    assert seconds < 8 + 45  # start-up (imports) + the timeout + teardown; main waited 600-1800 s


# -- time limit, requeue, failed saves -------------------------------------------------------

def test_a_time_limit_shorter_than_the_run_saves_within_the_measured_lead(slurm, tmp_path, launch_env):
    """Saves take 15 s (a slow file system); the floor of the lead is 10 s, shorter than a save:
    the script must ask the ranks early enough from what the saves measured, so the job saves
    before its 2-minute limit and is requeued, instead of ending in TIMEOUT (never requeued)."""
    config, run_dir = _config(tmp_path, steps=100000, save_every=10)
    out = tmp_path / "limited.out"
    job = slurm.submit(["--config", config], out, {**launch_env, "SLURM_LAUNCH": "srun", "PREEMPT_MIN_LEAD": "10",
                                                   "GPTSCALE_FAULT": "slow_save:15", "MAX_REQUEUES": "1"},
                       resources=(*slurm.RESOURCES, "--time=2"))
    try:
        wait_until(lambda: "requeueing job" in _output(out) or slurm.job_state(job) in ("TIMEOUT", "FAILED"), 200,
                   "the job to save and requeue before its time limit")
        output = _output(out)
        assert "requeueing job" in output, output[-4000:]
        leads = [int(x) for x in re.findall(r"preemption lead (\d+) s \(measured from the last save: \d+", output)]
        assert leads and leads[-1] >= 2 * 15 + 30, output[-4000:]  # from the measured saves, not the 10 s floor
        assert re.search(r"\d+ s before the time limit: asking the ranks to save", output)
        stopped = json.loads((tmp_path / "limited-job" / "stopped.json").read_text())
        saved = run_dir / "checkpoints" / f"step{stopped['step']:08d}"
        assert (saved / "COMPLETE.json").is_file()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(r["save_time_s"] for r in rows if "save_time_s" in r) >= 15
        wait_until(lambda: slurm.job_state(job) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), 60, "the requeued job")
    finally:
        slurm.slurm("scancel", job)


def test_crashes_are_retried_and_requeues_are_bounded(slurm, tmp_path, launch_env):
    """Rank 1 is killed after step 5 (checkpoints every 2 steps): the job is requeued and resumes
    from step 4. Preempted there, it saves but is not requeued again: MAX_REQUEUES=1."""
    config, run_dir = _config(tmp_path, steps=500, save_every=2)
    out = tmp_path / "crash.out"
    job = slurm.submit(["--config", config], out, {**launch_env, "SLURM_LAUNCH": "srun", "MAX_REQUEUES": "1",
                                                   "GPTSCALE_FAULT": "kill_at_step:5:1"})
    try:
        wait_until(lambda: "resumed from" in _output(out), 240, "the retried job to resume")
        output = _output(out)
        assert re.search(r"ranks failed \(status \d+\); requeueing job \d+ to resume from the newest checkpoint "
                         r"\(crash 1 of at most MAX_CRASH_RETRIES=2\)", output), output[-4000:]
        assert f"resumed from {run_dir}/checkpoints/step00000004" in output
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda: '"step": 8,' in metrics.read_text(), 120, "the retried job to train")
        assert slurm.slurm("scancel", "--signal=USR1", "--batch", job).returncode == 0
        assert slurm.wait_ended(job, 120) == "COMPLETED", _output(out)[-4000:]
        assert "not requeueing: job requeued 1 time(s) already (MAX_REQUEUES=1)" in _output(out)
    finally:
        slurm.slurm("scancel", job)


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KiB file system: room for a run's logs, not for a checkpoint (a full quota)."""
    folder = tmp_path / "full"
    folder.mkdir()
    done = run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], timeout=20)
    if done.returncode:
        (pytest.fail if REQUIRED else pytest.skip)(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        run(["umount", "-l", str(folder)], timeout=20)


def test_a_save_that_fails_after_the_signal_is_not_requeued(slurm, tmp_path, launch_env, full_disk):
    """On main the job requeued after any signal, so a save failing on a full quota looped forever."""
    run_dir = full_disk / "run"
    config = tmp_path / "full.yaml"
    config.write_text(_config(tmp_path, steps=500)[0].read_text().replace(str(tmp_path / "run"), str(run_dir)))
    out = tmp_path / "full.out"
    job = slurm.submit(["--config", config], out, {**launch_env, "SLURM_LAUNCH": "srun"})
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 180, "training steps")
        assert slurm.slurm("scancel", "--signal=USR1", "--batch", job).returncode == 0
        assert slurm.wait_ended(job, 120) == "FAILED", _output(out)[-4000:]
        output = _output(out)
        assert "not requeueing: the ranks did not save after the signal" in output, output[-4000:]
        assert re.search(r"writing checkpoint .*MiB free on that file system: full, or over a quota\?", output)
        assert "requeueing job" not in output
    finally:
        slurm.slurm("scancel", job)


# -- outside SLURM ---------------------------------------------------------------------------

def test_an_out_dir_that_the_nodes_do_not_share_is_refused(launch_env, tmp_path):
    """Node 1 sees its own (empty) folder where node 0 writes: a node-local out_dir."""
    shared = tmp_path / "shared"
    shared.mkdir()
    config, _ = _config(tmp_path)
    config.write_text(config.read_text().replace(str(tmp_path / "run"), str(shared / "run")))
    node = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631"}
    local = f"mount -t tmpfs tmpfs {shared} && exec {TORCHRUN} --config {config}"
    procs = [subprocess.Popen(cmd, env={**launch_env, **node, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
             for rank, cmd in ((0, [TORCHRUN, "--config", str(config)]), (1, ["unshare", "-m", "sh", "-c", local]))]
    try:
        output = "".join(p.communicate(timeout=180)[0] for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    assert all(p.returncode != 0 for p in procs), output[-3000:]
    assert "is not shared between the nodes, rank 1: on host" in output, output[-3000:]


def _older_torchrun(tmp_path) -> str:
    """A python whose torchrun is torch 2.6's: the flags added since (signal forwarding, shutdown
    timeout, NUMA binding, virtual local ranks) are unknown to it, as they are to NGC 25.01's."""
    shim = tmp_path / "torchrun_2_6.py"
    shim.write_text('''\
import torch.distributed.run as run

NEWER = {"--signals-to-handle", "--shutdown-timeout", "--numa-binding", "--virtual-local-rank",
         "--duplicate-stdout-filters", "--duplicate-stderr-filters"}
parser = run.get_args_parser()
for action in list(parser._actions):
    names = {n.replace("_", "-") for n in action.option_strings}
    if names & NEWER:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for name in action.option_strings:
            parser._option_string_actions.pop(name, None)
        parser.set_defaults(**{action.dest: action.default})
run.get_args_parser = lambda: parser
run.main()
''')
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\nif [[ "$1 $2" == "-m torch.distributed.run" ]]; then shift 2; '
                       f'exec {sys.executable} {shim} "$@"; fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_torchrun_sh_runs_under_an_older_torchrun(launch_env, tmp_path):
    config, run_dir = _config(tmp_path)
    python = _older_torchrun(tmp_path)
    assert "--signals-to-handle" not in run([python, "-m", "torch.distributed.run", "--help"], timeout=60).stdout
    done = run([TORCHRUN, "--config", str(config)], env={**launch_env, "PYTHON": python, "NPROC_PER_NODE": "1"},
               timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "cannot forward SIGUSR1 (--signals-to-handle, torch >= 2.9)" in done.stderr
    assert (run_dir / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()


def test_torchrun_names_the_failing_rank_and_its_error(launch_env, tmp_path):
    """With 2 ranks for tp=4, every rank fails with a configuration error; torchrun's summary
    shows the error (from the rank's error file), not `error_file: <N/A>`; rank logs are kept."""
    config, _ = _config(tmp_path)
    logs = tmp_path / "logs"
    done = run([TORCHRUN, "--config", str(config), "--set", "parallel.tp=4", "--set", "model.n_head=4"],
               env={**launch_env, "NPROC_PER_NODE": "2", "LOG_DIR": str(logs)}, timeout=180, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error_file: <N/A>" not in output, output[-3000:]
    assert "world size 2 is not divisible by parallel.tp*parallel.pp=4*1" in output.split("Root Cause")[-1], \
        output[-3000:]
    rank_logs = sorted(p.relative_to(logs).parts[-2:] for p in logs.rglob("stderr.log"))
    assert [part[0] for part in rank_logs] == ["0", "1"], rank_logs  # each rank's own file
