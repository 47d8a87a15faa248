#!/usr/bin/env bash
# gptscale under torchrun, one node or many. All logic stays in `gptscale train`; this only
# builds the torchrun command line.
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
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs, or 1 on CPU), MASTER_ADDR,
# MASTER_PORT (29500), RDZV static|c10d (static), RDZV_ID (job id), PYTHON (python3 on PATH),
# SHUTDOWN_TIMEOUT seconds granted to ranks saving after SIGTERM/SIGUSR1 (300).
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV=${RDZV:-static}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

# Forward SLURM's preemption warning (SIGUSR1) to the ranks, which save and exit 0, and
# give them time to do so before they are killed.
forwarded_signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
args=(--nproc-per-node "$NPROC_PER_NODE" --signals-to-handle "$forwarded_signals"
      --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}")
if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    args+=(--standalone)
elif [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the address of node rank 0) on every node" >&2
    exit 2
elif [[ "$RDZV" == c10d ]]; then
    args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
           --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-gptscale}}")
    [[ "${RDZV_HOST:-0}" == 1 ]] && args+=(--rdzv-conf is_host=1)
    [[ -n "${LOCAL_ADDR:-}" ]] && args+=(--local-addr "$LOCAL_ADDR")
else
    args+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m gptscale.cli train "$@"
