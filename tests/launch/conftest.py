import os
import subprocess
import sys

import pytest

from tests.launch.cluster import REPO, SlurmCluster


@pytest.fixture(scope="session")
def launch_env(tmp_path_factory):
    """Environment for launched ranks, with DeepSpeed's CPU communication op compiled once
    (ranks started over ssh would otherwise race to JIT-build it)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "GPTSCALE_RENDEZVOUS_TIMEOUT": "60",
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env, check=True, capture_output=True, timeout=600)
    return env


@pytest.fixture
def tiny_run(tmp_path):
    """A run config for 3 steps of a small model on synthetic data: (config path, run dir)."""
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""\
model: {{preset: tiny, vocab_size: 512, n_layer: 2, n_embd: 64, block_size: 64}}
data: {{synthetic: true, seq_len: 32}}
train: {{out_dir: {run_dir}, steps: 3, micro_batch: 2, eval_every: 0, eval_batches: 1, progress: false,
        tensorboard: false, sample_tokens: 0, warmup_steps: 1}}
""")
    return config, run_dir


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """slurmctld + two slurmd (n1, n2) on loopback, for every SLURM test."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
