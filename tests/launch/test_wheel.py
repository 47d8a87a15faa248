"""A non-editable install works away from the repository (issue 19): the wheel built from this
checkout, installed into a fresh folder and run from another one, answers `gptscale info`,
trains 2 steps on 2 ranks under torchrun with the DeepSpeed template it carries, and copies out
its launch scripts, example configs and templates (`gptscale launch-scripts`).

The wheel is built from a copy of the sources, so no build/ or egg-info lands in the checkout.
The venv's editable install stays in place: PYTHONPATH puts the target first, and the test
checks that every process imports gptscale from there."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from tests.launch.cluster import REPO, process_tree

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
pytestmark = pytest.mark.launch
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
MAPPED = SETUPTOOLS["package-dir"]  # package -> top-level folder of the repository, e.g. gptscale._launch -> launch
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def _run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, but a command past its timeout is killed with everything it started."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args[:6]))} ... did not finish within {timeout:.0f} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _source_copy(dest):
    """What the build reads (pyproject.toml, README.md, gptscale/ and the mapped folders)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("gptscale", *MAPPED.values()):
        shutil.copytree(REPO / folder, dest / folder, ignore=SKIP)
    return dest


def _expected_in_wheel(src) -> set[str]:
    """Every module of gptscale/ and every file of the mapped folders, at its place in the package."""
    names = {str(p.relative_to(src)) for p in (src / "gptscale").rglob("*.py")}
    for package, folder in MAPPED.items():
        prefix = package.replace(".", "/")
        names |= {f"{prefix}/{p.relative_to(src / folder)}" for p in (src / folder).rglob("*") if p.is_file()}
    return names


@pytest.mark.timeout(420)
def test_the_wheel_installed_elsewhere_trains_and_ships_its_scripts(tmp_path, launch_env):
    start = time.monotonic()
    src, wheels, target, work = _source_copy(tmp_path / "src"), tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", "--quiet"]
    done = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], 120, cwd=src)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = wheels.glob("gptscale-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        missing = _expected_in_wheel(src) - set(archive.namelist())
    assert not missing, f"the wheel leaves out {sorted(missing)[:5]}: add the package or glob to pyproject.toml"
    done = _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], 60)
    assert done.returncode == 0, done.stderr[-3000:]

    work.mkdir()
    env = {**launch_env, "PYTHONPATH": str(target)}  # and not the repository, which launch_env names
    where = _run([sys.executable, "-c", "import json, gptscale, gptscale.ds_templates as t; "
                  "print(json.dumps([gptscale.__file__, str(t.TEMPLATE_DIR), str(t.packaged_folder('gptscale._launch'))]))"],
                 30, cwd=work, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    for path in json.loads(where.stdout):
        assert path.startswith(str(target)), f"{path} is not from the installed wheel in {target}"

    gptscale = str(target / "bin" / "gptscale")  # the console script the wheel installs
    done = _run([gptscale, "info", "--set", "model.preset=tiny", "--world-size", "2"], 60, cwd=work, env=env)
    assert done.returncode == 0 and "run mode: zero3" in done.stdout, done.stderr[-3000:]

    run = work / "run"
    overrides = ["model.preset=tiny", "model.vocab_size=512", "model.n_layer=2", "model.n_embd=64", "model.block_size=64",
                 "data.synthetic=true", "data.seq_len=32", "train.steps=2", "train.micro_batch=2", "train.warmup_steps=1",
                 "train.eval_batches=1", "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0",
                 f"train.out_dir={run}"]
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "gptscale.cli", "train", *(arg for o in overrides for arg in ("--set", o))], 150, cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run / "checkpoints" / "step00000002" / "COMPLETE.json").is_file(), sorted(os.listdir(run))
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps and steps[-1] == 2, steps

    copied = work / "scripts"
    done = _run([gptscale, "launch-scripts", str(copied)], 30, cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    for name in ("launch/torchrun.sh", "launch/slurm/pretrain.sbatch", "configs/tiny.yaml", "ds_configs/zero3.json",
                 "ds_configs/precision/bf16.json"):
        assert (copied / name).is_file(), name
    assert os.access(copied / "launch" / "torchrun.sh", os.X_OK) and not (copied / "launch" / "__init__.py").exists()
    assert (copied / "launch" / "torchrun.sh").read_bytes() == (REPO / "launch" / "torchrun.sh").read_bytes()
    again = _run([gptscale, "launch-scripts", str(copied)], 30, cwd=work, env=env)
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr, again.stderr
    assert [line for line in again.stderr.splitlines() if line.strip()] == [again.stderr.strip()], again.stderr
    print(f"wheel built, installed, info, 2-rank training and launch-scripts in {time.monotonic() - start:.1f} s")
