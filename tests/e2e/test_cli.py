"""The console script, run as a user runs it."""
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gptscale(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_help_explains_the_commands():
    out = gptscale("--help")
    assert out.returncode == 0
    for command in ("presets", "info", "selftest"):
        assert command in out.stdout


def test_presets_table():
    out = gptscale("presets")
    assert out.returncode == 0
    assert "124.44M" in out.stdout and "6.74B" in out.stdout and "1.01T" in out.stdout


def test_info_reports_sizes_and_layout(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: llama-7b\nparallel:\n  tp: 4\n  pp: 2\n")
    out = gptscale("info", "--config", str(cfg), "--world-size", "16")
    assert out.returncode == 0, out.stderr
    assert "parameters: 6,738,415,616" in out.stdout
    assert "tp groups: [[0, 1, 2, 3], [4, 5, 6, 7]" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["info", "--set", "model.n_heads=4"], "unknown config key 'model.n_heads'; did you mean 'n_head'?"),
    (["info", "--set", "parallel.tp=5"], "model.n_head=12 is not divisible by parallel.tp=5"),
    (["info", "--set", "parallel.tp=4", "--world-size", "6"], "world size 6 is not divisible"),
    (["info", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["selftest", "--ranks", "3"], "model.n_head=4 is not divisible by parallel.tp=3"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = gptscale(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("gptscale: error: ")
    assert message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.dist
def test_selftest_passes_on_two_ranks():
    out = gptscale("selftest", "--ranks", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASS") == 5  # 2 presets x 2 ranks + the verdict
