#!/usr/bin/env bash
# What docker/check.sh runs inside the images it builds (no network): `in_image.sh cpu` in the CPU
# image, `in_image.sh gpu` in the GPU image built with CUDA=0.
set -euo pipefail
export OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo  # no network: gloo on the loopback
failed=()
step() {  # step NAME COMMAND...: run it, remember a failure, go on
    "${@:2}" || failed+=("$1")
}

versions() {
    python3 -c 'import sys, torch, deepspeed; print("python", sys.version.split()[0], "torch", torch.__version__,
        "deepspeed", deepspeed.__version__, "cuda", torch.version.cuda)'
}

cpu() {
    versions
    step selftest gptscale selftest --ranks 2
    step "unit tests" unit_tests
    step training train
}

unit_tests() {
    python -m pytest -q -p no:cacheprovider tests/unit 2>&1 | tail -4
}

train() {  # run by step, so without set -e: every command checks
    local r=/tmp/run
    mkdir -p "$r"
    { gptscale data train-tokenizer --input builtin:python --vocab-size 4096 --out "$r/tokenizer" &&
        gptscale data prepare --input builtin:python --tokenizer "$r/tokenizer" --out "$r/data" --shard-size 1MB \
            --val-fraction 0.02; } >"$r/data.log" 2>&1 || { tail -20 "$r/data.log"; return 1; }
    echo "training the tiny preset for 20 steps on 2 ranks (log: $r/train.log)"
    torchrun --standalone --nproc_per_node 2 -m gptscale.cli train --config configs/tiny.yaml \
        --set "train.out_dir=$r/tiny" --set "data.path=$r/data" --set train.steps=20 --set train.warmup_steps=5 \
        --set train.eval_every=10 >"$r/train.log" 2>&1 || { tail -30 "$r/train.log"; return 1; }
    python - "$r/tiny/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
loss = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
first, last = loss[0], loss[-1]
print(f"training: loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}; "
      f"validation loss {val[-1]['val_loss']:.3f} at step {val[-1]['step']}")
assert last["step"] == 20 and last["loss"] < first["loss"], "the loss did not fall over 20 steps"
PY
}

gpu() {
    export DS_ACCELERATOR=cpu OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    versions
    python3 -c 'import mpi4py; print("mpi4py", mpi4py.__version__)'
    mpirun --version | head -1
    step "mpi4py under mpirun" mpirun --oversubscribe -n 2 python3 -c 'from mpi4py import MPI; c = MPI.COMM_WORLD
print(f"mpi4py under mpirun: rank {c.rank} of {c.size}, allreduce of rank+1 = {c.allreduce(c.rank + 1)}")'
    install -d -m 700 /root/.ssh
    ssh-keygen -q -t ed25519 -N "" -f /root/.ssh/id_ed25519
    cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys
    /usr/sbin/sshd -p 2222
    # shellcheck disable=SC2016  # $(hostname) runs on the node pdsh reaches
    PDSH_RCMD_TYPE=ssh \
        PDSH_SSH_ARGS_APPEND="-p 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR" \
        step "pdsh over sshd" pdsh -w localhost 'echo "pdsh -> sshd on port 2222: $(hostname) answers"'
    step ds_report ds_report_lines
    step selftest gptscale selftest --ranks 2
}

ds_report_lines() {
    ds_report >/tmp/ds_report.txt 2>&1 || { cat /tmp/ds_report.txt; return 1; }
    grep -E "^(torch version|deepspeed info|deepspeed wheel compiled|accelerator)" /tmp/ds_report.txt || true
}

case "${1:-}" in
    cpu | gpu) "$1" ;;
    *) echo "usage: in_image.sh cpu|gpu" >&2; exit 2 ;;
esac
if ((${#failed[@]})); then echo "in_image.sh $1: FAILED: ${failed[*]}"; exit 1; fi
echo "in_image.sh $1: all passed"
