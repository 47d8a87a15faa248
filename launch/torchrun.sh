#!/usr/bin/env bash
# gptscale under torchrun, one node or many. All logic stays in `gptscale train` (or the command
# GPTSCALE_COMMAND names, e.g. finetune); this only builds the torchrun command line.
#
#   launch/torchrun.sh --config configs/tiny.yaml [--set key=value ...]       # this node, all devices
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh --config ...   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh --config ...   # on node2
#   NNODES=2 RDZV=c10d MASTER_ADDR=node1 launch/torchrun.sh --config ...     # elastic rendezvous, any order
#
# With c10d, the node whose address is MASTER_ADDR serves the rendezvous store; torchrun
# recognises itself by host name, which fails where names and addresses differ (network
# namespaces, several addresses): set RDZV_HOST=1 on that node to say so. LOCAL_ADDR is
# the address other nodes reach this one at (default: what its host name resolves to).
#
# Environment:
#   NNODES (1), NODE_RANK (0), MASTER_ADDR, RDZV static|c10d (static), RDZV_ID (job id)
#   MASTER_PORT       under SLURM 15000 + job id % 20000 (two jobs can share a node), else 29500
#   NPROC_PER_NODE    ranks on this node: SLURM's GPUs on this node, else the GPUs torch sees, else 1
#   RDZV_TIMEOUT      seconds the nodes wait for each other to start (GPTSCALE_RENDEZVOUS_TIMEOUT, 300):
#                     a node that never starts fails the job after this
#   SHUTDOWN_TIMEOUT  seconds granted to ranks saving after SIGTERM/SIGUSR1 (300); never shorter than a save
#   LOG_DIR           every rank's stdout/stderr in files there (torchrun --log-dir --tee), and only
#                     LOG_RANKS (local ranks, "0") on the console
#   NUMA_BINDING      torchrun --numa-binding on GPU nodes (node; "none" to turn it off)
#   PYTHON            python3 on PATH
#
# Flags newer than the torchrun at hand (an NGC image's older torch) are left out with a warning.
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
else
    MASTER_PORT=${MASTER_PORT:-29500}
fi
RDZV=${RDZV:-static}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-${GPTSCALE_RENDEZVOUS_TIMEOUT:-300}}
# GPUs on this node: SLURM's grant, else torch's count (asked only when it is needed: a python start).
gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z "$gpus" && ( -z "${NPROC_PER_NODE:-}" || -n "$(command -v nvidia-smi)" ) ]]; then
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
fi
gpus=${gpus:-0}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi

torchrun_help=$("$PYTHON" -m torch.distributed.run --help 2>&1)
supports() { grep -q -- "$1" <<<"$torchrun_help"; }
args=(--nproc-per-node "$NPROC_PER_NODE")
# Forward SLURM's preemption warning (SIGUSR1) to the ranks, which save and exit 0, and give
# them time to do so before they are killed.
if supports --signals-to-handle; then
    args+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
else
    echo "launch/torchrun.sh: warning: this torchrun (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')) cannot forward SIGUSR1 (--signals-to-handle, torch >= 2.9): a preemption warning ends the ranks without a save; use SIGTERM, or a newer torch" >&2
fi
if supports --shutdown-timeout; then
    args+=(--shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}")
fi
if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    args+=(--log-dir "$LOG_DIR" --tee 3)
    if supports --local-ranks-filter; then args+=(--local-ranks-filter "${LOG_RANKS:-0}"); fi
fi
# Each rank on the CPUs (and memory) nearest its GPU; only where there are real GPUs to be near.
if (( gpus > 0 )) && command -v nvidia-smi >/dev/null && [[ "${NUMA_BINDING:-node}" != none ]] \
        && supports --numa-binding; then
    args+=(--numa-binding "${NUMA_BINDING:-node}")
fi
if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    args+=(--standalone)
elif [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the address of node rank 0) on every node" >&2
    exit 2
elif [[ "$RDZV" == c10d ]]; then
    args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
           --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-gptscale}}")
    conf="join_timeout=$RDZV_TIMEOUT"
    [[ "${RDZV_HOST:-0}" == 1 ]] && conf+=",is_host=1"
    args+=(--rdzv-conf "$conf")
    [[ -n "${LOCAL_ADDR:-}" ]] && args+=(--local-addr "$LOCAL_ADDR")
else
    args+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
           --rdzv-conf "timeout=$RDZV_TIMEOUT")
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m gptscale.cli "${GPTSCALE_COMMAND:-train}" "$@"
