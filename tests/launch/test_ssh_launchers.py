"""Launchers that reach other hosts over ssh: the deepspeed launcher (pdsh, openmpi, mpich)
and plain mpirun, on hosts node1 / node2 (two sshd on 127.0.0.2 / 127.0.0.3, each with its
own host name); and accelerate. Each trains 3 steps with one rank per host."""
import os
import sys

import pytest

from tests.launch.checks import assert_two_ranks_trained
from tests.launch.cluster import REPO, SshHosts, require, run

pytestmark = pytest.mark.launch
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SshHosts(tmp_path_factory.mktemp("ssh")) as emulated:
        yield emulated


def _env(launch_env, hosts, tmp_path, first=()):
    """ssh wrapper first on PATH (every launcher's ssh finds node1/node2), then the venv (this
    python, ninja, Open MPI's mpirun); a private .deepspeed_env file."""
    path = os.pathsep.join([*map(str, first), str(hosts.bin), VENV_BIN, launch_env["PATH"]])
    return {**launch_env, "PATH": path, "DS_ENV_FILE": str(tmp_path / "deepspeed_env"),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _mpich_first(tmp_path):
    """A folder whose `mpirun` is MPICH's Hydra (DeepSpeed's mpich runner calls plain `mpirun`,
    which the venv's Open MPI would answer). A script, not a link: Hydra looks for its proxy
    beside the path it was called by."""
    require("/usr/bin/mpiexec.hydra")
    folder = tmp_path / "mpich-bin"
    folder.mkdir()
    (folder / "mpirun").write_text('#!/bin/sh\nexec /usr/bin/mpiexec.hydra "$@"\n')
    (folder / "mpirun").chmod(0o755)
    return folder


@pytest.mark.parametrize("launcher, seen_as", [("pdsh", "deepspeed"), ("openmpi", "openmpi"),
                                               ("mpich", "deepspeed")])
def test_deepspeed_launcher_with_a_two_host_hostfile(hosts, launch_env, tiny_run, tmp_path, launcher, seen_as):
    require("pdsh" if launcher == "pdsh" else "mpirun")
    config, run_dir = tiny_run
    first = [_mpich_first(tmp_path)] if launcher == "mpich" else []
    env = {**_env(launch_env, hosts, tmp_path, first), "HOSTFILE": str(hosts.hostfile("node1", "node2")),
           "DS_LAUNCHER": launcher}
    done = run([str(REPO / "launch" / "deepspeed.sh"), "--config", str(config)], env=env, timeout=300, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert_two_ranks_trained(run_dir, output, seen_as)
    # The launcher exported the venv's PATH to the remote ranks through the DS_ENV_FILE.
    assert (tmp_path / "deepspeed_env").read_text().startswith(f"PATH={VENV_BIN}:")


def test_plain_mpirun_across_two_hosts(hosts, launch_env, tiny_run, tmp_path):
    """Open MPI starts one rank per host; rank 0's address reaches the others through mpi4py."""
    config, run_dir = tiny_run
    env = {**_env(launch_env, hosts, tmp_path), "NP": "2", "HOSTFILE": str(hosts.hostfile("node1", "node2")),
           "MPIRUN": os.path.join(VENV_BIN, "mpirun")}
    done = run([str(REPO / "launch" / "mpirun.sh"), "--config", str(config)], env=env, timeout=300, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert_two_ranks_trained(run_dir, output, "openmpi")
    assert "broadcast with mpi4py" in output


def test_a_hostfile_naming_an_unreachable_host_fails_fast(hosts, launch_env, tiny_run, tmp_path):
    config, run_dir = tiny_run
    env = {**_env(launch_env, hosts, tmp_path), "HOSTFILE": str(hosts.hostfile("ghost", "node1"))}
    done = run([str(REPO / "launch" / "deepspeed.sh"), "--config", str(config)], env=env, timeout=120, cwd=REPO)
    assert done.returncode != 0
    assert "host=ghost was not reachable via ssh" in done.stdout + done.stderr
    assert not run_dir.exists()


def test_accelerate_launch_with_deepspeed_zero3(launch_env, tiny_run):
    config, run_dir = tiny_run
    done = run([os.path.join(VENV_BIN, "accelerate"), "launch", "--config_file",
                str(REPO / "launch" / "accelerate" / "zero3.yaml"), "-m", "gptscale.cli", "train", "--config",
                str(config)], env=launch_env, timeout=300, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert_two_ranks_trained(run_dir, output, "accelerate")


def test_deepspeed_launcher_openmpi_gets_the_real_interface_and_ssh_port(hosts, launch_env, tmp_path):
    """DeepSpeed's Open MPI runner adds `btl_tcp_if_include eth0` unless told an interface and
    drops --ssh_port (deepspeed#4460): the hosts here are reached over `lo`, sshd on port 2222.
    Checked on the command line DeepSpeed hands to mpirun (a recording one)."""
    fake = tmp_path / "fake-ompi"
    fake.mkdir()
    record = fake / "argv"
    (fake / "mpirun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (fake / "ompi_info").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("mpirun", "ompi_info"):
        (fake / tool).chmod(0o755)
    env = {**_env(launch_env, hosts, tmp_path, [fake]), "HOSTFILE": str(hosts.hostfile("node1", "node2")),
           "DS_LAUNCHER": "openmpi", "SSH_PORT": "2222"}
    done = run([str(REPO / "launch" / "deepspeed.sh"), "--config", "x.yaml"], env=env, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    argv = record.read_text().splitlines()
    pairs = {(argv[i + 1], argv[i + 2]) for i, word in enumerate(argv[:-2]) if word == "--mca"}
    assert ("btl_tcp_if_include", "lo") in pairs and ("btl_tcp_if_include", "eth0") not in pairs, argv
    assert ("plm_rsh_args", "-p 2222") in pairs, argv
