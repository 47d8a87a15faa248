"""`gptscale sweep` as a user runs it: a tiny grid trains (each run under torchrun), a second call
skips every finished run, --dry-run only prints, --fit-only fits finished runs, and a bad sweep
config is one line with exit code 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
BASE = """\
model: {preset: tiny, vocab_size: 512, n_layer: 1, n_embd: 32, n_head: 2, block_size: 64}
data: {synthetic: true, seq_len: 32}
train: {micro_batch: 2, eval_batches: 1, eval_every: 1, warmup_steps: 1, progress: false, tensorboard: false,
        peak_tflops: 1.0}
"""


def gptscale(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, check=False)


def one_line_error(done, message):
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gptscale: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr


def write_sweep(tmp_path, body: str, name="sweep.yaml"):
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / name
    path.write_text(f"base: {tmp_path / 'base.yaml'}\nout_dir: {tmp_path / 'out'}\n{body}")
    return path


def test_sweep_trains_then_skips_what_is_done(tmp_path):
    path = write_sweep(tmp_path, "sizes: [{n_layer: 1}, {n_layer: 2, name: two}]\ntokens: [128]\n"
                                 "set: [train.sample_tokens=0]\nfit: {enabled: false}\n")
    dry = gptscale("sweep", "--config", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "[1/2] L1-D128: N=" in dry.stdout and "2 steps" in dry.stdout
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 -m gptscale.cli train" in dry.stdout
    assert f"train.out_dir={tmp_path / 'out' / 'runs' / 'two-D128'}" in dry.stdout and "--resume auto" in dry.stdout
    assert not (tmp_path / "out").exists()

    done = gptscale("sweep", "--config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": started,") == 2 and done.stdout.count(": done, val loss") == 2, done.stdout
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["L1-D128", "two-D128"] and result["fit"] is None
    assert all(r["final_val_loss"] > 0 and r["D"] == 128 and r["steps"] == 2 for r in result["runs"])
    assert (tmp_path / "out" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "runs" / "two-D128" / "checkpoints" / "step00000002").is_dir()

    again = gptscale("sweep", "--config", str(path))
    assert again.returncode == 0 and again.stdout.count(": skipped, done (val loss") == 2, again.stdout
    assert "started" not in again.stdout


def test_fit_only_fits_finished_runs(tmp_path):
    from gptscale.scaling.fit import ScalingLaw
    from gptscale.scaling.sweep import load_sweep

    path = write_sweep(tmp_path, "sizes: [{n_embd: 32}, {n_embd: 64}, {n_embd: 128}]\ntokens: [640, 1280, 2560]\n"
                                 "fit: {bootstrap: 20, budget: 1.0e+12}\n")
    early = gptscale("sweep", "--config", str(path), "--fit-only")
    one_line_error(early, "is done yet")
    sweep = load_sweep(path)
    law = ScalingLaw(E=2.0, A=50.0, B=200.0, alpha=0.4, beta=0.35)
    for run in sweep.runs:  # what the runs' metrics would say at their last step
        folder = sweep.run_dir(run)
        folder.mkdir(parents=True)
        loss = float(law.loss(run.params_non_embedding, run.tokens))
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 6.3}) + "\n" +
                                              json.dumps({"step": run.steps, "val_loss": loss}) + "\n{broken")
    done = gptscale("sweep", "--config", str(path), "--fit-only", "--budget", "1e13")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fit of 9 runs" in done.stdout and "compute-optimal at C = 1e+13 FLOPs (--budget" in done.stdout
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    fitted = result["fit"]["parameters"]
    assert fitted["alpha"] == pytest.approx(0.4, rel=1e-3) and fitted["E"] == pytest.approx(2.0, rel=1e-3)
    assert result["fit"]["budget"]["N_opt"] == pytest.approx(law.compute_optimal(1e13)[0], rel=1e-2)
    assert np.all(np.diff([r["C"] for r in result["runs"][:2]]) > 0)
    for png in ("loss_curves.png", "loss_vs_compute.png", "fit.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out" / "logs").exists()  # nothing trained


@pytest.mark.parametrize("body, message", [
    ("sizes: [{n_layer: 1}]\ntokens: [128]\n", "1 size(s) x 1 token budget(s) = 1 run(s); the fit of L(N, D)"),
    ("sizes: [{n_layer: 1}, {n_layr: 2}]\ntokens: [128, 256, 512]\n",
     "sizes[1] (n_layr2) with base"),
    ("sizes: [{n_layer: 1}, {n_layer: 2}]\ntokens: [128, -5, 512]\n", "tokens[1]=-5 must be a positive number"),
    ("sizes: [{n_layer: 1}, {n_layer: 2}]\ntokens: [128, 256, 512]\nlauncher: {nprocs: 2}\n",
     "unknown config key 'launcher.nprocs'; did you mean 'nproc'?"),
    ("sizes: [{n_layer: 1}, {n_layer: 2}]\ntokens: [128, 256, 512]\nset: [train.steps=3]\n",
     "the sweep sets train.steps of each run itself"),
])
def test_bad_sweep_config_is_one_line(tmp_path, body, message):
    one_line_error(gptscale("sweep", "--config", str(write_sweep(tmp_path, body)), "--dry-run"), message)
