"""Rank and address discovery from whichever launcher started this process, in one place.

`discover()` reads the environment that torchrun, the deepspeed launcher, accelerate,
Open MPI, MPICH (Hydra), SLURM's srun or nothing at all leave behind, and says which one it
found and where rank 0's address comes from; `init_distributed()` then starts
torch.distributed with it. No launcher-specific flags anywhere else.

Rank 0's address, in order: MASTER_ADDR if set; every rank on one node -> 127.0.0.1;
under srun, the first host of the step's node list (`scontrol show hostnames`); under
Open MPI / MPICH, rank 0's address broadcast with mpi4py. Otherwise a clear error.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

from gptscale.config import tp_groups_span_nodes
from gptscale.errors import LaunchError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # torchrun, accelerate, deepspeed, openmpi, mpich, slurm, single process
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None
    address_from: str = ""  # where master_addr came from, for the start-up line
    placement: str = ""  # rank 0 only: where the first ranks run (host, CPUs, device), to check binding

    @property
    def one_node(self) -> bool:
        return self.local_world_size == self.world_size

    def describe(self) -> str:
        where = f", rank 0 at {self.master_addr}:{self.master_port} ({self.address_from})" if self.master_addr else ""
        placed = f"\n  placement: {self.placement}" if self.placement else ""
        return f"{self.launcher}: rank {self.rank} of {self.world_size}, local rank {self.local_rank}{where}{placed}"


def cpu_ranges(cpus) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _int(env, *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def _ranks(env) -> tuple[str, int, int, int, int] | None:
    """(launcher, rank, world size, local rank, local world size) from the environment."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torch.distributed's own variables win
        if any(k.startswith("ACCELERATE_") for k in env):
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
            launcher = "deepspeed"
        else:
            launcher = "environment (RANK/WORLD_SIZE)"
        world = int(env["WORLD_SIZE"])
        return (launcher, int(env["RANK"]), world, _int(env, "LOCAL_RANK", default=0),
                _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world))
    if "OMPI_COMM_WORLD_RANK" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        return ("openmpi", int(env["OMPI_COMM_WORLD_RANK"]), world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=world))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world = int(env["PMI_SIZE"])
        return ("mpich", int(env["PMI_RANK"]), world, _int(env, "MPI_LOCALRANKID", default=0),
                _int(env, "MPI_LOCALNRANKS", default=world))
    # srun sets SLURM_STEP_NUM_TASKS; a batch script's own shell has SLURM_NTASKS but is one process.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1)
        return ("slurm", int(env["SLURM_PROCID"]), world, _int(env, "SLURM_LOCALID", default=0),
                world if nodes == 1 else _tasks_on_this_node(env, world))
    return None


def _tasks_on_this_node(env, world: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like '2(x3),1'; this node's count is its SLURM_NODEID-th entry."""
    counts = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        if not part:
            continue
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = _int(env, "SLURM_NODEID", default=0)
    return counts[node] if node < len(counts) else world


def slurm_first_host(env) -> str | None:
    """The address of the step's first node: its NodeAddr (what slurmd is reached at; node
    names need not resolve), from `scontrol`."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        names = _scontrol("show", "hostnames", nodelist).split()
        if not names:
            return None
        match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", names[0]))
    except (OSError, subprocess.SubprocessError):
        return None
    return match.group(1) if match else names[0]


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def this_host_address() -> str:
    """An address other nodes can reach this one at: the interface of GLOO_SOCKET_IFNAME if
    set, else the one the default route leaves by (no packet is sent), else loopback."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]  # gloo accepts a list; its first
    if ifname:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
            return socket.inet_ntoa(packed[20:24])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _mpi_broadcast_address() -> tuple[str, int]:
    """Rank 0's reachable address and a free port on it, sent to every rank with mpi4py."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    here = (this_host_address(), free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(here, root=0)


def discover(environ=None, mpi_broadcast=_mpi_broadcast_address) -> LaunchEnv:
    env = os.environ if environ is None else environ
    found = _ranks(env)
    if found is None:
        return LaunchEnv("single process", 0, 1, 0, 1, "127.0.0.1", None, "one process")
    launcher, rank, world, local_rank, local_world = found
    port = _int(env, "MASTER_PORT")
    if env.get("MASTER_ADDR"):
        addr, source = env["MASTER_ADDR"], "MASTER_ADDR"
    elif local_world == world:
        addr, source = "127.0.0.1", "all ranks on this node"
    elif launcher == "slurm" and (first := slurm_first_host(env)):
        addr, source = first, "first host of the SLURM node list"
    elif launcher in ("openmpi", "mpich"):
        addr, mpi_port = mpi_broadcast()
        port, source = port or mpi_port, "rank 0's address, broadcast with mpi4py"
    else:
        raise LaunchError(f"{launcher} started rank {rank} of {world} across nodes but MASTER_ADDR is not set; "
                          f"export MASTER_ADDR=<rank 0's host> (and MASTER_PORT) on every node")
    return LaunchEnv(launcher, rank, world, local_rank, local_world, addr, port or DEFAULT_PORT, source)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def job_tag(env=None) -> str:
    """A name unique to this job among the jobs sharing a node, the same on all its ranks: the
    SLURM job id, else rank 0's port (two live jobs cannot share it). Names per-job scratch."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return f"port-{env.get('MASTER_PORT', DEFAULT_PORT)}"


def cuda_device(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank that sees `visible` devices: its local rank when it sees the
    node's devices, device 0 when the scheduler gave each task its own (srun --gpus-per-task=1,
    --gpu-bind=single:1), where local ranks 1.. would be an invalid ordinal."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"local rank {local_rank} sees only {visible} CUDA device(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank "
                          f"per GPU (torchrun --nproc-per-node / srun --ntasks-per-node = GPUs per node)")
    return local_rank


def gpus_granted(env=None) -> int:
    """GPUs the scheduler gave this node (SLURM's GRES), 0 if it gave none or is not there."""
    env = os.environ if env is None else env
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
        if value:  # a list of indices, "0,1,2"
            return len(value.split(","))
    return 0


def check_gpu_present(cuda_available: bool, env=None) -> None:
    """A GPU job that cannot see its GPUs must stop, not train on CPU at a hundredth of the speed.

    GPTSCALE_REQUIRE_GPU=1 requires CUDA; =0 never does; unset, CUDA is required when the
    scheduler granted GPUs, unless DS_ACCELERATOR=cpu says CPU on purpose."""
    env = os.environ if env is None else env
    wanted = env.get("GPTSCALE_REQUIRE_GPU", "")
    granted = gpus_granted(env)
    required = wanted == "1" or (wanted == "" and granted > 0 and env.get("DS_ACCELERATOR") != "cpu")
    if required and not cuda_available:
        import torch

        why = f"SLURM granted {granted} GPU(s) on this node" if granted else "GPTSCALE_REQUIRE_GPU=1"
        raise LaunchError(f"{why} (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}) but torch "
                          f"{torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda or 'no'}); "
                          f"install a CUDA build of torch or load the GPU driver, or set GPTSCALE_REQUIRE_GPU=0 to "
                          f"train on CPU")


JOINED, ALL_JOINED = "gptscale/joined", "gptscale/all_joined"


def wait_for_world(store, rank: int, world: int, timeout_s: float, where: str = "") -> str:
    """Every rank checks in with rank 0's store and waits, at most `timeout_s`, until all have:
    a node that never started fails the job here, with the missing ranks named, instead of
    leaving every other rank blocked in its first collective for the collective timeout.
    Returns, on rank 0, where the first 8 ranks run (each rank's `where`)."""
    import time

    store.set(f"{JOINED}/{rank}", where or socket.gethostname())
    if store.add(JOINED, 1) == world:
        store.set(ALL_JOINED, "1")
    started = time.monotonic()
    try:
        store.wait([ALL_JOINED], timedelta(seconds=timeout_s))
    except Exception:  # DistStoreError / RuntimeError, by torch version
        joined = store.add(JOINED, 0)
        missing = [r for r in range(world) if not store.check([f"{JOINED}/{r}"])] if rank == 0 else []
        named = ", ".join(map(str, missing[:16])) + (f" and {len(missing) - 16} more" if len(missing) > 16 else "")
        raise LaunchError(
            f"rank {rank}: only {joined} of {world} ranks joined within {time.monotonic() - started:.0f} s"
            + (f"; missing rank(s) {named}" if missing else "")
            + "; a node did not start or cannot reach rank 0 (see its log); the wait is "
              "GPTSCALE_RENDEZVOUS_TIMEOUT seconds") from None
    if rank != 0:
        return ""
    shown = min(world, 8)
    return "; ".join(f"rank {r} {store.get(f'{JOINED}/{r}').decode()}" for r in range(shown)) + \
        (f"; ... ({world - shown} more)" if world > shown else "")


def init_distributed(timeout_s: float = 600.0, rendezvous_timeout_s: float | None = None) -> LaunchEnv:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) unless it already is.

    Rendezvous is bounded by `rendezvous_timeout_s` (default 300 s, or GPTSCALE_RENDEZVOUS_TIMEOUT):
    a rank that cannot reach rank 0 fails with the address it tried, and all ranks wait that
    long at most for the whole world to join. `timeout_s` bounds every collective afterwards
    (`parallel.collective_timeout_s`): a node dying mid-run ends the job after it, not after
    torch's default half hour.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        found = _ranks(os.environ)
        local = found[3] if found else 0
        return LaunchEnv("pre-initialised", dist.get_rank(), dist.get_world_size(), local, dist.get_world_size())
    found = discover()
    if found.world_size == 1 and found.master_port is None:
        found = LaunchEnv(found.launcher, 0, 1, 0, 1, "127.0.0.1", free_port(), found.address_from)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = cuda_device(found.local_rank, torch.cuda.device_count()) if backend == "nccl" else None
    # DeepSpeed and torch read these themselves, whatever launcher started us. DeepSpeed takes its
    # device from LOCAL_RANK: with one device per task that is device 0, whatever the local rank.
    for key, value in (("RANK", found.rank), ("WORLD_SIZE", found.world_size),
                       ("LOCAL_RANK", found.local_rank if device is None else device),
                       ("LOCAL_WORLD_SIZE", found.local_world_size), ("MASTER_ADDR", found.master_addr),
                       ("MASTER_PORT", found.master_port)):
        os.environ[key] = str(value)
    if device is not None:
        torch.cuda.set_device(device)
        # A collective that times out leaves NCCL's flight record behind: which rank waited for what.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    rendezvous = rendezvous_timeout_s or float(os.environ.get("GPTSCALE_RENDEZVOUS_TIMEOUT", 300))
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT; every rank is its client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(found.master_addr, found.master_port, found.world_size,
                              is_master=found.rank == 0 and not agent_store, timeout=timedelta(seconds=rendezvous),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise LaunchError(f"rank {found.rank} could not reach rank 0 at {found.master_addr}:{found.master_port} "
                          f"({found.address_from}) within {rendezvous:.0f} s: {str(exc).splitlines()[0]}; check that "
                          f"the address is reachable from every node and the port is free") from None
    if agent_store:
        # The agent keeps its store across the rounds of a restarted group (torchrun --max-restarts):
        # each round gets keys of its own, or it reads the dead round's addresses.
        store = dist.PrefixStore(f"/gptscale/round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    where = (f"{socket.gethostname()} cpus {cpu_ranges(os.sched_getaffinity(0))} "
             f"{'cpu' if device is None else f'cuda:{device}'} "
             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    placement = wait_for_world(store, found.rank, found.world_size, rendezvous, where)
    dist.init_process_group(backend, store=store, rank=found.rank, world_size=found.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dataclasses.replace(found, placement=placement)


def check_tp_within_node(tp: int, launch: LaunchEnv, backend: str) -> None:
    """Tensor-parallel groups (tp consecutive ranks) must not span nodes: they all-reduce twice
    per layer, which over the network instead of NVLink costs most of the step. Every node
    must hold whole TP groups. On GPUs (NCCL) this is an error; on CPU test clusters a warning."""
    if launch.one_node:
        return
    message = tp_groups_span_nodes(tp, launch.local_world_size)
    if message is None:
        return
    if backend == "nccl":
        raise LaunchError(message)
    if launch.rank == 0:
        print(f"gptscale train: warning: {message}", flush=True)
