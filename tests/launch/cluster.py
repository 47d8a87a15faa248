"""Emulated cluster services for the launch tests, all on this one machine.

Every daemon is started in its own session and stopped by PID (never by name), every
namespace is removed, also when a test fails: each service is a context manager.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# CI sets this: a missing tool there is a failure, not a skip.
REQUIRED = os.environ.get("GPTSCALE_REQUIRE_LAUNCH_TOOLS") == "1"


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        message = f"launch test needs {', '.join(missing)} (.ci/run installs them)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s")


class Daemons:
    """Processes started in their own sessions; `stop()` ends each (and its process group) by PID."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args, log: Path, env=None) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        for proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the daemon's own session: it and whatever it forked, nothing else
    except ProcessLookupError:
        pass


def run(args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


# -- SLURM ----------------------------------------------------------------------------------

# cred_expire=10: a requeued job may start again 10 s after its old run (SLURM waits for the old
# run's credentials to expire: 120 s by default, which only slows the tests).
SLURM_CONF = """\
ClusterName=gptscale
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=30
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port1} CPUs=2 Gres=gpu:2 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port2} CPUs=2 Gres=gpu:2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""

# Two fake GPUs per node: /dev/null's twins where /dev/nvidiaN would be. slurmd only stats them; what
# the jobs get is real SLURM GPU accounting: --gpus-per-node, --gpus-per-task binding and the
# CUDA_VISIBLE_DEVICES / SLURM_GPUS_ON_NODE a task sees.
GRES_CONF = """\
AutoDetect=off
NodeName=n[1-2] Name=gpu File={root}/dev/nvidia[0-1]
"""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class SlurmCluster:
    """munged, slurmctld and two slurmd (nodes n1, n2 on this host, their own ports), each node with
    2 CPUs (bound per task by task/affinity) and 2 fake GPUs."""

    def __init__(self, root: Path, base_port: int = 16817):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons = Daemons()
        self.ports = (base_port, base_port + 1, base_port + 2)

    def __enter__(self) -> "SlurmCluster":
        require("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch")
        for sub in ("state", "log", "spool/n1", "spool/n2", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for gpu in range(2):  # character devices, as slurmd insists: copies of /dev/null
            os.mknod(self.root / "dev" / f"nvidia{gpu}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        ctld, p1, p2 = self.ports
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=ctld, port1=p1, port2=p2))
        (self.root / "gres.conf").write_text(GRES_CONF.format(root=self.root))
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        socket_dir = self.root / "munge"
        socket_dir.mkdir(exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            raise RuntimeError("munge key /etc/munge/munge.key is missing (installing the munge package creates it)")
        self.munge_socket = socket_dir / "munge.socket"
        # munged refuses a key or folders it does not own; run it as root with --force on our own socket.
        self.daemons.start(["/usr/sbin/munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                            f"--pid-file={socket_dir / 'munged.pid'}", f"--seed-file={socket_dir / 'seed'}",
                            f"--log-file={self.root / 'log' / 'munged.log'}"], self.root / "log" / "munged.out")
        wait_until(self.munge_socket.exists, 20, "munged")
        self.daemons.start(["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)], self.root / "log" / "ctld.out",
                           env=self.env)
        for node in ("n1", "n2"):
            self.daemons.start(["/usr/sbin/slurmd", "-D", "-f", str(self.conf), "-N", node],
                               self.root / "log" / f"{node}.out", env=self.env)
        wait_until(lambda: self.sinfo() == "n1 idle n2 idle", 60, "slurm nodes n1 and n2")

    def sinfo(self) -> str:
        done = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, timeout=20)
        return " ".join(done.stdout.split())

    def slurm(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(list(args), env=self.env, timeout=timeout)

    # Each job as the real script asks: one task per node, the node's GPUs; on the emulated nodes
    # one fake GPU and both CPUs per node unless a test asks otherwise.
    RESOURCES = ("-N", "2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-gpu=2")

    def submit(self, script_args, out: Path, env: dict, resources=RESOURCES, script="pretrain.sbatch") -> str:
        """sbatch launch/slurm/SCRIPT with `resources`; the job's folder beside `out`. Returns the job id."""
        env = {"GPTSCALE_JOB_DIR": str(out.parent / f"{out.stem}-job"), **env, "SLURM_CONF": str(self.conf),
               "GPTSCALE_HOME": str(REPO)}
        done = run(["sbatch", "--parsable", *resources, f"--output={out}", "--chdir", str(REPO),
                    str(REPO / "launch" / "slurm" / script), *map(str, script_args)], env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def wait_ended(self, job: str, timeout: float) -> str:
        return wait_until(lambda: (s := self.job_state(job)) in ENDED and s, timeout, f"SLURM job {job}")

    def job_state(self, job: str) -> str:
        out = self.slurm("scontrol", "show", "job", "-o", job).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def __exit__(self, *exc) -> None:
        # Jobs first, while slurmd can still end their steps; then the daemons.
        try:
            self.slurm("scancel", "--user", os.environ.get("USER", "root"), timeout=20)
            wait_until(lambda: not self.slurm("squeue", "-h", timeout=20).stdout.strip(), 40, "jobs cancelled")
        except Exception:
            pass
        self.daemons.stop()


# -- two ssh "hosts" -------------------------------------------------------------------------

SSHD_CONFIG = """\
Port {port}
HostKey {root}/hostkey
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
LogLevel INFO
"""

SSH_CONFIG = """\
Host node1
    HostName 127.0.0.2
Host node2
    HostName 127.0.0.3
Host node1 node2 127.0.0.2 127.0.0.3
    Port {port}
    User root
    IdentityFile {root}/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 10
"""


class SshHosts:
    """Hosts node1 (127.0.0.2) and node2 (127.0.0.3): an sshd each on port 2222 with key-only
    root login, each in its own UTS namespace so each has its own host name (Open MPI hangs
    when two hosts report one name). `bin/ssh` wraps ssh with this config; put `bin` first on
    PATH and every launcher's ssh (DeepSpeed's check, pdsh, Open MPI, Hydra) reaches them."""

    HOSTS = {"node1": "127.0.0.2", "node2": "127.0.0.3"}

    def __init__(self, root: Path, port: int = 2222):
        self.root, self.port = root, port
        self.bin = root / "bin"
        self.daemons = Daemons()

    def __enter__(self) -> "SshHosts":
        require("/usr/sbin/sshd", "ssh", "ssh-keygen", "unshare", "pdsh")
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        for key in ("hostkey", "id_ed25519"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)], timeout=30, check=True)
        (self.root / "authorized_keys").write_text((self.root / "id_ed25519.pub").read_text())
        (self.root / "authorized_keys").chmod(0o600)
        (self.root / "sshd_config").write_text(SSHD_CONFIG.format(root=self.root, port=self.port))
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text(SSH_CONFIG.format(root=self.root, port=self.port))
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.ssh_config} "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        for name, addr in self.HOSTS.items():
            sshd = (f"hostname {name}; exec /usr/sbin/sshd -D -f {self.root}/sshd_config -o ListenAddress={addr} "
                    f"-o PidFile={self.root}/sshd-{name}.pid -E {self.root}/sshd-{name}.log")
            self.daemons.start(["unshare", "--uts", "sh", "-c", sshd], self.root / f"sshd-{name}.out")
        for name in self.HOSTS:
            wait_until(lambda: self.ssh(name, "hostname").stdout.strip() == name, 30, f"sshd on {name}")

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return run([str(self.bin / "ssh"), host, command], timeout=20)

    def hostfile(self, *hosts: str, slots: int = 1) -> Path:
        path = self.root / ("hostfile-" + "-".join(hosts))
        path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
        return path

    def __exit__(self, *exc) -> None:
        self.daemons.stop()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (torchrun starts its ranks in sessions of their own,
    so a process group does not reach them; a scheduler signals the whole job)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found
