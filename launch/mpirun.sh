#!/usr/bin/env bash
# gptscale under plain mpirun (Open MPI or MPICH's Hydra), one rank per slot.
#
#   NP=16 HOSTFILE=hosts launch/mpirun.sh --config my.yaml [--set key=value ...]
#
# Ranks are read from OMPI_COMM_WORLD_* / PMI_* by `gptscale train`; without MASTER_ADDR,
# rank 0's address is broadcast with mpi4py. Environment: NP (ranks, required), HOSTFILE
# (Open MPI: "host slots=N"; MPICH: "host:N"), MPIRUN (mpirun on PATH), MPI_ARGS (extra
# mpirun arguments), EXPORT_VARS (variables passed to every rank), PYTHON.
#
# Passed to every rank besides EXPORT_VARS: LD_LIBRARY_PATH and every NCCL_*, TORCH_NCCL_*,
# TORCH_DISTRIBUTED_*, UCX_*, FI_* and GPTSCALE_* variable set here, so remote ranks run with
# the launch node's network settings (a rank with other NCCL settings hangs or uses sockets).
set -euo pipefail

PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
: "${NP:?launch/mpirun.sh needs NP, the number of ranks}"
EXPORT_VARS=${EXPORT_VARS:-"PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME MASTER_ADDR MASTER_PORT"}
EXPORT_VARS+=" LD_LIBRARY_PATH $(compgen -e | { grep -E '^(NCCL|TORCH_NCCL|TORCH_DISTRIBUTED|UCX|FI|GPTSCALE)_' || true; } | tr '\n' ' ')"
python=$("$PYTHON" -c 'import sys; print(sys.executable)')

exports=()
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
    for name in $EXPORT_VARS; do [[ -n "${!name:-}" ]] && exports+=(-x "$name"); done
    hosts=(); [[ -n "${HOSTFILE:-}" ]] && hosts=(--hostfile "$HOSTFILE")
else  # MPICH / Hydra
    list=""; for name in $EXPORT_VARS; do [[ -n "${!name:-}" ]] && list+="${list:+,}$name"; done
    [[ -n "$list" ]] && exports=(-genvlist "$list")
    hosts=(); [[ -n "${HOSTFILE:-}" ]] && hosts=(-f "$HOSTFILE")
fi
# shellcheck disable=SC2086  # MPI_ARGS is a list of words
exec "$MPIRUN" -n "$NP" "${hosts[@]}" "${exports[@]}" ${MPI_ARGS:-} "$python" -m gptscale.cli train "$@"
