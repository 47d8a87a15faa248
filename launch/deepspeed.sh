#!/usr/bin/env bash
# gptscale under the `deepspeed` launcher with a hostfile ("host slots=N" per line).
#
#   HOSTFILE=hosts launch/deepspeed.sh --config my.yaml [--set key=value ...]                 # pdsh over ssh
#   HOSTFILE=hosts DS_LAUNCHER=openmpi launch/deepspeed.sh --config my.yaml                   # Open MPI's mpirun
#   HOSTFILE=hosts DS_LAUNCHER=mpich launch/deepspeed.sh --config my.yaml                     # MPICH's Hydra
#
# Environment: HOSTFILE (required for several hosts; without it: this node's devices),
# DS_LAUNCHER pdsh|openmpi|mpich (pdsh), MASTER_ADDR (default: the first host's `hostname -I`),
# MASTER_PORT (15000 + job id % 20000 under SLURM, else 29500), SSH_PORT, LAUNCHER_ARGS (extra
# arguments for pdsh / mpirun), IFACE (openmpi: the network interface between the hosts;
# default NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, else the one the route to the first host
# leaves by), PYTHON.
#
# Remote ranks start with the remote login's environment. This script writes the variables
# they need into a .deepspeed_env file (DS_ENV_FILE) that the launcher exports on every host:
# PATH with this Python's bin folder first (so the remote side finds the same python,
# ninja and MPI), LD_LIBRARY_PATH, every NCCL_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_*, UCX_*,
# FI_* and GPTSCALE_* variable (a rank with another NCCL setting than its peers hangs or falls
# back to sockets), and whichever of EXPORT_VARS are set here.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
EXPORT_VARS=${EXPORT_VARS:-"PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME HF_HOME"}
EXPORT_VARS+=" LD_LIBRARY_PATH $(compgen -e | { grep -E '^(NCCL|TORCH_NCCL|TORCH_DISTRIBUTED|UCX|FI|GPTSCALE)_' || true; } | tr '\n' ' ')"

bin_dir=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
if [[ -z "${DS_ENV_FILE:-}" ]]; then
    env_file=$(mktemp "${TMPDIR:-/tmp}/gptscale-deepspeed-env.XXXXXX")
    trap 'rm -f "$env_file"' EXIT  # ours: removed when the launcher ends
else
    env_file=$DS_ENV_FILE
fi
{
    echo "PATH=$bin_dir:$PATH"
    for name in $EXPORT_VARS; do
        if [[ -n "${!name:-}" ]]; then echo "$name=${!name}"; fi
    done
} > "$env_file"
# DeepSpeed's pdsh runner puts each value in double quotes on the remote command line, where
# $( ), backticks, quotes and backslashes would be expanded by the remote shell: refuse them.
if grep -q '[$`"\\]' "$env_file"; then
    echo "launch/deepspeed.sh: $(grep -m1 '[$`"\\]' "$env_file" | cut -d= -f1) holds \$, \`, \" or \\, which the remote shell would expand; set it without them" >&2
    exit 2
fi
export DS_ENV_FILE=$env_file  # an absolute path: the launcher reads it instead of ~/.deepspeed_env

if [[ -n "${SLURM_JOB_ID:-}" ]]; then default_port=$((15000 + SLURM_JOB_ID % 20000)); else default_port=29500; fi
args=(--master_port "${MASTER_PORT:-$default_port}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER")
fi
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${SSH_PORT:-}" ]] && args+=(--ssh_port "$SSH_PORT")
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
if [[ "$DS_LAUNCHER" == openmpi && -n "${HOSTFILE:-}" ]]; then
    # DeepSpeed's Open MPI runner adds `--mca btl_tcp_if_include eth0` unless told an interface
    # (deepspeed#4460), and ignores --ssh_port: say both, unless LAUNCHER_ARGS already does.
    if [[ "$LAUNCHER_ARGS" != *btl_tcp_if_include* ]]; then
        iface=${IFACE:-${NCCL_SOCKET_IFNAME:-${GLOO_SOCKET_IFNAME:-}}}
        if [[ -z "$iface" ]]; then
            # The first host as ssh reaches it (its config may rename it), its address, the route there.
            first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
            first_name=$(ssh -G "$first_host" 2>/dev/null | awk '$1 == "hostname" {print $2; exit}' || true)
            first_addr=$(getent ahostsv4 "${first_name:-$first_host}" | awk '{print $1; exit}' || true)
            iface=$(ip -o route get "${first_addr:-$first_host}" 2>/dev/null | grep -oP ' dev \K\S+' || true)
        fi
        if [[ -z "$iface" ]]; then
            echo "launch/deepspeed.sh: cannot tell the network interface to the hosts of $HOSTFILE; set IFACE (e.g. IFACE=ib0)" >&2
            exit 2
        fi
        LAUNCHER_ARGS+=" --mca btl_tcp_if_include $iface"
    fi
    if [[ -n "${SSH_PORT:-}" && "$LAUNCHER_ARGS" != *plm_rsh_args* ]]; then
        LAUNCHER_ARGS+=" --mca plm_rsh_args '-p $SSH_PORT'"
    fi
fi
[[ -n "$LAUNCHER_ARGS" ]] && args+=(--launcher_args "$LAUNCHER_ARGS")
if [[ "$DS_LAUNCHER" == mpich ]]; then
    # DeepSpeed 0.19's MPICH runner puts `-m` in front of its own helper script, so
    # --module breaks it: hand it gptscale's CLI as a script file instead.
    entry=("$("$PYTHON" -c 'import gptscale.cli; print(gptscale.cli.__file__)')")
else
    entry=(--module gptscale.cli)
fi
# Not exec'd (the env file is removed on exit), so signals sent to this script are passed on.
"$bin_dir/deepspeed" "${args[@]}" "${entry[@]}" train "$@" &
launcher=$!
trap 'kill -TERM $launcher 2>/dev/null' TERM INT
trap 'kill -USR1 $launcher 2>/dev/null' USR1
status=0
while true; do
    wait $launcher; status=$?
    # `wait` returns early (status > 128) when a trapped signal arrives; the launcher goes on.
    kill -0 $launcher 2>/dev/null || break
done
exit $status
