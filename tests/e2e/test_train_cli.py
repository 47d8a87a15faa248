"""`gptscale train` / `generate` / `plot` as a user runs them (one process), and their bad input."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
SMALL = ["--set", "model.preset=tiny", "--set", "model.vocab_size=512", "--set", "model.n_layer=2",
         "--set", "model.n_embd=64", "--set", "model.block_size=64", "--set", "data.seq_len=32",
         "--set", "train.micro_batch=2", "--set", "train.eval_batches=1", "--set", "train.progress=false"]


def gptscale(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_line_error(done, message):
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gptscale: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("extra, message", [
    (["--set", "data.synthetic=true", "--set", "train.stepz=3"], "unknown config key 'train.stepz'; did you mean 'steps'?"),
    (["--set", "data.synthetic=true", "--set", "train.ds_config=nope.json"], "train.ds_config 'nope.json' does not exist"),
    (["--set", "data.path=/nonexistent/data"], "/nonexistent/data/manifest.json: no manifest"),
    (["--set", "data.synthetic=true", "--set", "parallel.dp=2"],
     "parallel.tp*pp*dp=1*1*2=2 does not equal the world size 1"),
    (["--set", "data.synthetic=true", "--set", "parallel.pp=2", "--set", "train.ds_config=zero3"],
     "train.ds_config 'zero3' uses ZeRO stage 3, but parallel.mode=pipe (parallel.pp=2) runs DeepSpeed's "
     "PipelineEngine, which supports only ZeRO stage 0 or 1"),
    (["--set", "data.synthetic=true", "--set", "parallel.pp=3"], "parallel.pp=3 exceeds model.n_layer=2"),
])
def test_bad_input(tmp_path, extra, message):
    done = gptscale("train", *SMALL, "--set", f"train.out_dir={tmp_path / 'run'}", *extra)
    one_line_error(done, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_generate_plot_and_refuse_another_shape(tmp_path):
    run = tmp_path / "run"
    common = [*SMALL, "--set", "data.synthetic=true", "--set", f"train.out_dir={run}", "--set", "train.steps=2"]
    done = gptscale("train", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = run / "checkpoints" / "step00000002"
    assert (ckpt / "COMPLETE.json").is_file() and (run / "metrics.jsonl").is_file()

    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    other = gptscale("train", *common, "--set", "model.n_layer=3", "--set", "train.steps=4")
    one_line_error(other, "is for another model shape (model.n_layer: checkpoint 2 vs config 3)")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert before == after  # nothing overwritten

    plotted = gptscale("plot", str(run))
    assert plotted.returncode == 0 and Path(plotted.stdout.strip()).read_bytes()[:4] == b"\x89PNG"
    no_tokenizer = gptscale("generate", "--checkpoint", str(ckpt), "--prompt", "x")
    assert no_tokenizer.returncode != 0 and "pass --tokenizer" in no_tokenizer.stderr


def test_sigterm_ends_a_rank_stuck_in_start_up_at_once(tmp_path):
    """Rank 0 of 2 waits at the rendezvous for a rank 1 that never comes; SIGTERM (a scheduler
    giving up on the job) must end it now, not after the rendezvous timeout."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GPTSCALE_RENDEZVOUS_TIMEOUT": "600"}
    rank = subprocess.Popen([sys.executable, "-m", "gptscale.cli", "train", *SMALL, "--set", "data.synthetic=true",
                             "--set", f"train.out_dir={tmp_path / 'run'}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        time.sleep(8)  # imports done, waiting for rank 1
        assert rank.poll() is None
        rank.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rank.wait(timeout=30)
        assert time.monotonic() - sent < 5 and rank.returncode == -signal.SIGTERM
    finally:
        if rank.poll() is None:
            rank.kill()
            rank.wait()
