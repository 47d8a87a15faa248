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


# -- cluster readiness: devices, GPUs granted, rendezvous, TP placement, job scratch ----------

def test_a_rank_with_one_visible_gpu_uses_device_0():
    from gptscale.launch import cuda_device

    assert cuda_device(local_rank=5, visible=1) == 0  # srun --gpus-per-task=1: device 5 does not exist here
    assert cuda_device(local_rank=5, visible=8) == 5
    with pytest.raises(LaunchError, match="local rank 3 sees only 2 CUDA device"):
        cuda_device(local_rank=3, visible=2)


def test_granted_gpus_without_cuda_stop_the_run_unless_cpu_is_asked_for():
    from gptscale.launch import check_gpu_present, gpus_granted

    assert gpus_granted({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert gpus_granted({"SLURM_JOB_GPUS": "0,1,2"}) == 3
    assert gpus_granted({}) == 0
    with pytest.raises(LaunchError, match=r"SLURM granted 8 GPU\(s\) on this node .* GPTSCALE_REQUIRE_GPU=0"):
        check_gpu_present(False, {"SLURM_GPUS_ON_NODE": "8"})
    check_gpu_present(False, {"SLURM_GPUS_ON_NODE": "8", "DS_ACCELERATOR": "cpu"})  # CPU on purpose
    check_gpu_present(False, {"SLURM_GPUS_ON_NODE": "8", "GPTSCALE_REQUIRE_GPU": "0"})
    check_gpu_present(False, {})  # no scheduler, no GPUs asked for: a CPU run
    with pytest.raises(LaunchError, match="GPTSCALE_REQUIRE_GPU=1"):
        check_gpu_present(False, {"GPTSCALE_REQUIRE_GPU": "1"})
    check_gpu_present(True, {"SLURM_GPUS_ON_NODE": "8"})


def test_the_world_waits_for_every_rank_and_names_the_missing_ones():
    import threading
    import time as clock
    from datetime import timedelta

    import torch.distributed as dist

    from gptscale.launch import free_port, wait_for_world

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 3, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=30))
    errors = []

    def rank_1():
        try:
            wait_for_world(client, 1, 3, 2.0, "n2 cpus 1 cpu")
        except LaunchError as err:
            errors.append(str(err))

    waiting = threading.Thread(target=rank_1)
    waiting.start()
    started = clock.monotonic()
    with pytest.raises(LaunchError, match=r"rank 0: only 2 of 3 ranks joined within 2 s; missing rank\(s\) 2; a node"):
        wait_for_world(server, 0, 3, 2.0, "n1 cpus 0 cpu")
    waiting.join()
    assert clock.monotonic() - started < 10
    assert errors and "only 2 of 3 ranks joined" in errors[0]

    # All present: rank 0 learns where each runs.
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=30))
    other = threading.Thread(target=wait_for_world, args=(client, 1, 2, 10.0, "n2 cpus 1 cpu"))
    other.start()
    placement = wait_for_world(server, 0, 2, 10.0, "n1 cpus 0 cpu")
    other.join()
    assert placement == "rank 0 n1 cpus 0 cpu; rank 1 n2 cpus 1 cpu"


def test_tensor_parallel_groups_must_fit_in_a_node(capsys):
    from gptscale.launch import LaunchEnv, check_tp_within_node

    four_per_node = LaunchEnv("torchrun", 0, 16, 0, 4)
    check_tp_within_node(4, four_per_node, "nccl")
    check_tp_within_node(2, four_per_node, "nccl")
    with pytest.raises(LaunchError, match="parallel.tp=8 does not divide the 4 rank"):
        check_tp_within_node(8, four_per_node, "nccl")
    check_tp_within_node(8, four_per_node, "gloo")  # CPU test clusters: a warning
    assert "warning: parallel.tp=8" in capsys.readouterr().out
    check_tp_within_node(8, LaunchEnv("torchrun", 0, 8, 0, 8), "nccl")  # one node


def test_scratch_and_ports_are_the_jobs_own():
    from gptscale.launch import job_tag

    assert job_tag({"SLURM_JOB_ID": "123", "MASTER_PORT": "1"}) != job_tag({"SLURM_JOB_ID": "124", "MASTER_PORT": "1"})
    assert job_tag({"MASTER_PORT": "29511"}) != job_tag({"MASTER_PORT": "29512"})


def test_cpu_ranges_are_compact():
    from gptscale.launch import cpu_ranges

    assert cpu_ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert cpu_ranges({3}) == "3"
