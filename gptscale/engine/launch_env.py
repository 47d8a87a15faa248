"""Rank and address discovery from whichever launcher started this process, in one place.

Understands torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK), Open MPI
(OMPI_COMM_WORLD_*), MPICH / Intel MPI (PMI_RANK, PMI_SIZE), SLURM (SLURM_PROCID,
SLURM_NTASKS) and a plain single process.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int


_SCHEMES = (
    ("torchrun/deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def discover(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    for launcher, rank, size, local in _SCHEMES:
        if rank in env and size in env:
            return LaunchEnv(launcher, int(env[rank]), int(env[size]), int(env.get(local, 0)))
    return LaunchEnv("single process", 0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> LaunchEnv:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) unless it already is."""
    import torch
    import torch.distributed as dist

    found = discover()
    # DeepSpeed reads these itself, whatever launcher started us.
    for key, value in (("RANK", found.rank), ("WORLD_SIZE", found.world_size), ("LOCAL_RANK", found.local_rank)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized():
        return LaunchEnv("pre-initialised", dist.get_rank(), dist.get_world_size(), found.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if found.world_size == 1:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "29500"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(found.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=found.rank, world_size=found.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return found
