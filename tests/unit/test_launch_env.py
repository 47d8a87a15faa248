"""Rank and address discovery from each launcher's environment (no processes started)."""
import pytest

from gptscale.errors import LaunchError
from gptscale.launch import _tasks_on_this_node, discover


def no_mpi():
    raise AssertionError("mpi4py must not be asked when the address is known")


@pytest.mark.parametrize("env, launcher, ranks, addr, source", [
    ({}, "single process", (0, 1, 0, 1), "127.0.0.1", "one process"),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}, "torchrun", (3, 4, 1, 2), "10.0.0.1", "MASTER_ADDR"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "1",
      "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}, "deepspeed", (1, 2, 0, 1), "node1", "MASTER_ADDR"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true",
      "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1"}, "accelerate", (1, 2, 1, 2), "127.0.0.1", "MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, "openmpi", (2, 4, 0, 4), "127.0.0.1", "all ranks on this node"),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "h0"},
     "mpich", (1, 2, 0, 1), "h0", "MASTER_ADDR"),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "1"},
     "slurm", (5, 8, 1, 8), "127.0.0.1", "all ranks on this node"),
])
def test_each_launcher_is_recognised(env, launcher, ranks, addr, source):
    found = discover(env, mpi_broadcast=no_mpi)
    assert found.launcher == launcher
    assert (found.rank, found.world_size, found.local_rank, found.local_world_size) == ranks
    assert (found.master_addr, found.address_from) == (addr, source)
    assert launcher in found.describe()


def test_a_batch_scripts_own_shell_is_one_process():
    # sbatch's shell sees SLURM_NTASKS=8 but is not one of 8 ranks; only srun sets SLURM_STEP_NUM_TASKS.
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}).world_size == 1


def test_mpi_across_nodes_asks_rank_0_for_its_address():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    found = discover(env, mpi_broadcast=lambda: ("10.1.2.3", 41000))
    assert (found.master_addr, found.master_port) == ("10.1.2.3", 41000)
    assert "mpi4py" in found.address_from


def test_ranks_across_nodes_without_master_addr_fail_clearly():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}
    with pytest.raises(LaunchError, match="torchrun started rank 1 of 2 across nodes but MASTER_ADDR is not set; "
                                          "export MASTER_ADDR"):
        discover(env, mpi_broadcast=no_mpi)


def test_slurm_tasks_per_node_notation():
    env = {"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}
    assert _tasks_on_this_node(env, 7) == 1
    assert _tasks_on_this_node({**env, "SLURM_NODEID": "1"}, 7) == 2
