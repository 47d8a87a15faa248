#!/usr/bin/env bash
# gptscale under the `deepspeed` launcher with a hostfile ("host slots=N" per line).
#
#   HOSTFILE=hosts launch/deepspeed.sh --config my.yaml [--set key=value ...]                 # pdsh over ssh
#   HOSTFILE=hosts DS_LAUNCHER=openmpi launch/deepspeed.sh --config my.yaml                   # Open MPI's mpirun
#   HOSTFILE=hosts DS_LAUNCHER=mpich launch/deepspeed.sh --config my.yaml                     # MPICH's Hydra
#
# Environment: HOSTFILE (required for several hosts; without it: this node's devices),
# DS_LAUNCHER pdsh|openmpi|mpich (pdsh), MASTER_ADDR (default: the first host's `hostname -I`),
# MASTER_PORT (29500), SSH_PORT, LAUNCHER_ARGS (extra arguments for pdsh / mpirun), PYTHON.
#
# Remote ranks start with the remote login's environment. This script writes the variables
# they need into a .deepspeed_env file (DS_ENV_FILE) that the launcher exports on every host:
# PATH with this Python's bin folder first (so the remote side finds the same python,
# ninja and MPI), and whichever of EXPORT_VARS are set here.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
EXPORT_VARS=${EXPORT_VARS:-"PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME NCCL_IB_HCA GPTSCALE_RENDEZVOUS_TIMEOUT HF_HOME"}

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

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER")
fi
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${SSH_PORT:-}" ]] && args+=(--ssh_port "$SSH_PORT")
[[ -n "${LAUNCHER_ARGS:-}" ]] && args+=(--launcher_args "$LAUNCHER_ARGS")
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
