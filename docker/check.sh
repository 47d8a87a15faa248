#!/usr/bin/env bash
# `make docker-check`: build both images on this machine, with no public image registry, and run them.
#
#  1. A Docker engine: the one `docker info` reaches, or else a private dockerd started here (as root;
#     vfs storage, no iptables, no bridge, all its data in a temporary folder; stopped by its PID).
#  2. A local base image, gptscale-check/debian:bookworm: debootstrap --variant=minbase from the
#     Debian archive this machine's apt sources name, piped through `docker import`.
#  3. A wheelhouse: this machine's pip, as configured for `make install`, downloads the Makefile's
#     torch pin (TORCH) and every Python package the images install; the builds (--network host)
#     install from it alone, served on 127.0.0.1 (PIP_NO_INDEX=1, PIP_FIND_LINKS). docker/Dockerfile.cpu
#     is built from the local base.
#  4. In the CPU image, with no network: `gptscale selftest --ranks 2`, the unit tests and 20 steps
#     of the tiny preset on 2 ranks (tokenizer and shards made in the container first).
#  5. docker/Dockerfile.gpu from the same base with CUDA=0: its MPI, pdsh, sshd, DeepSpeed and mpi4py
#     layers, then an mpi4py allreduce under mpirun on 2 ranks, pdsh over the image's sshd, ds_report
#     and the selftest. What only a CUDA host proves is listed in the README's Docker section.
#  Prints build times and image sizes. Images, the daemon and its data, the rootfs and the served
#  folder are removed at the end unless KEEP=1 (then the daemon keeps running; its PID is printed).
#
# Environment: KEEP=1; TORCH (default the Makefile's); PYTHON (a Python 3.11 with pip, for the
# wheelhouse; default python3); MIRROR (Debian archive; default from apt);
# ONLY=cpu|gpu (build one image); CHECK_LOCK=FILE runs the CPU-heavy steps under `flock FILE`;
# WORK_PARENT (default /var/tmp) holds the temporary folder (the vfs driver copies every layer:
# ~15 GB at the peak).
set -euo pipefail
cd "$(dirname "$0")/.."
{  # the whole script is read before it runs: editing or pulling it meanwhile changes nothing

KEEP=${KEEP:-0}
TORCH=${TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
ONLY=${ONLY:-}
SUITE=bookworm
BASE=gptscale-check/debian:$SUITE
CPU_IMAGE=gptscale-check:cpu
GPU_IMAGE=gptscale-check:gpu-nocuda

say() { printf '\n== docker-check: %s\n' "$*"; }
die() { printf 'docker-check: %s\n' "$*" >&2; exit 2; }
# CPU-heavy steps run between lock and unlock: one at a time when CHECK_LOCK names a lock file
# (timed from when the lock is held).
lock() { if [[ -n "${CHECK_LOCK:-}" ]]; then exec 9>>"$CHECK_LOCK" && flock 9; fi; }
unlock() { if [[ -n "${CHECK_LOCK:-}" ]]; then flock -u 9 && exec 9>&-; fi; }

WORK=$(mktemp -d "${WORK_PARENT:-/var/tmp}/gptscale-docker.XXXXXX")
DOCKERD_PID=""
HTTP_PID=""
IMAGES=()

# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$HTTP_PID" ]]; then kill "$HTTP_PID"; wait "$HTTP_PID"; fi 2>/dev/null
    if [[ "$KEEP" == 1 ]]; then
        say "KEEP=1: kept ${IMAGES[*]:-no image} and $WORK"
        [[ -z "$DOCKERD_PID" ]] || echo "daemon PID $DOCKERD_PID; DOCKER_HOST=$DOCKER_HOST; stop it: kill $DOCKERD_PID"
        exit "$rc"
    fi
    if [[ -n "$DOCKERD_PID" ]]; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" && sleep 1
        # what dockerd leaves mounted (its network namespace) goes before the folder
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n 1 umount -l
    elif ((${#IMAGES[@]})); then
        docker rmi -f "${IMAGES[@]}" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    echo "docker-check: removed ${IMAGES[*]:-no image} and $WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() {  # the Debian packages whose commands are missing, installed when root
    local missing=() pair
    for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
    ((${#missing[@]})) || return 0
    [[ "$(id -u)" == 0 ]] || die "needs ${missing[*]} (apt-get install -y ${missing[*]}) or root to install them"
    apt-get -o DPkg::Lock::Timeout=600 -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
}

# 1. the engine
if docker info >/dev/null 2>&1; then
    say "using the Docker engine at ${DOCKER_HOST:-the default socket}"
else
    need dockerd:docker.io docker:docker.io
    [[ "$(id -u)" == 0 ]] || die "no Docker engine reachable, and starting one needs root"
    say "starting a private dockerd in $WORK"
    export DOCKER_HOST="unix://$WORK/docker.sock"
    dockerd --host "$DOCKER_HOST" --data-root "$WORK/root" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
        --storage-driver vfs --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not start (log above)"; }
fi
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed

# 2. the base image
if [[ -z "${MIRROR:-}" ]]; then
    # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders
    MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s && $3 == "main" { print $1; exit }')
fi
[[ -n "$MIRROR" ]] || die "no Debian archive for $SUITE in apt's sources; set MIRROR=http://.../debian"
need debootstrap:debootstrap
say "base $BASE: debootstrap --variant=minbase $SUITE from $MIRROR"
start=$SECONDS
debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
tar -C "$WORK/rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE" >/dev/null
IMAGES+=("$BASE")
rm -rf "$WORK/rootfs"
echo "base image in $((SECONDS - start)) s"

# 3. the wheelhouse: this machine's pip, configured as `make install` finds it (index, find-links,
#    certificate, constraints), downloads the Makefile's torch pin and every Python package the images
#    install; the builds install from that folder alone (served on 127.0.0.1, no index), so no build
#    needs a registry, a proxy or this machine's certificates.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11, $SUITE's: set PYTHON=python3.11 (it downloads the images' wheels)"
ds_version=$(sed -n 's/^ARG DEEPSPEED_VERSION=//p' docker/Dockerfile.gpu)
"$PYTHON" - "$ds_version" >"$WORK/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"],
          *project["project"]["optional-dependencies"]["test"],
          f"deepspeed=={sys.argv[1]}", "mpi4py", "pip", "setuptools", "wheel"]  # Dockerfile.gpu's, the builders
print("\n".join(wanted))
PY
say "wheelhouse: $TORCH and the images' packages through this machine's pip ($PYTHON)"
start=$SECONDS
# shellcheck disable=SC2086  # TORCH is a list of pip arguments, as in the Makefile
"$PYTHON" -m pip download -q -d "$WORK/wheels" $TORCH -r "$WORK/requirements.txt" 2>"$WORK/download.log" \
    || { tail -20 "$WORK/download.log" >&2; die "pip download failed (log above)"; }
echo "$(find "$WORK/wheels" -type f | wc -l) files, $(du -sm "$WORK/wheels" | cut -f1) MB in $((SECONDS - start)) s:" \
    "$(cd "$WORK/wheels" && echo torch-*)"
"$PYTHON" -u -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" 0 >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
port=""
for _ in $(seq 50); do
    port=$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$WORK/http.log" | head -1)
    [[ -z "$port" ]] || break
    sleep 0.2
done
[[ -n "$port" ]] || die "the wheelhouse server did not start: $(cat "$WORK/http.log")"
pip_args=(--build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")

build() {  # build IMAGE DOCKERFILE [ARGS...]: prints the build time and the image size
    local image=$1 file=$2 start log
    shift 2
    log="$WORK/build-${image##*:}.log"
    say "building $image from $file (log: $log while it runs)"
    lock
    start=$SECONDS
    if ! docker build --network host -f "$file" -t "$image" \
        --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH=$TORCH" "${pip_args[@]}" "$@" . >"$log" 2>&1; then
        tail -40 "$log" >&2
        die "building $file failed (last lines above)"
    fi
    unlock
    IMAGES+=("$image")
    local seconds=$((SECONDS - start)) size
    size=$(docker image inspect -f '{{.Size}}' "$image")
    printf 'built %s in %d min %02d s; image size %s MB\n' "$image" $((seconds / 60)) $((seconds % 60)) \
        $((size / 1000000))
    echo "$image $seconds $size" >>"$WORK/summary"
}

in_image() {  # in_image IMAGE WHAT: docker/in_image.sh WHAT in a fresh container with no network
    # (--hostname localhost: torchrun's rendezvous and gloo need a hostname that resolves)
    lock
    docker run --rm --network none --hostname localhost --shm-size=2g "$1" bash -c "$(cat docker/in_image.sh)" in_image.sh "$2"
    unlock
}

# 4. the CPU image
if [[ "$ONLY" != gpu ]]; then
    build "$CPU_IMAGE" docker/Dockerfile.cpu
    say "in $CPU_IMAGE: selftest, unit tests, 20 training steps of the tiny preset on 2 ranks"
    in_image "$CPU_IMAGE" cpu
fi

# 5. the GPU image's layers, without CUDA
if [[ "$ONLY" != cpu ]]; then
    build "$GPU_IMAGE" docker/Dockerfile.gpu --build-arg CUDA=0
    say "in $GPU_IMAGE: mpi4py under mpirun, pdsh over sshd, ds_report, selftest"
    in_image "$GPU_IMAGE" gpu
fi

say "summary"
while read -r image seconds size; do
    printf '%-28s built in %d min %02d s, %s MB\n' "$image" $((seconds / 60)) $((seconds % 60)) $((size / 1000000))
done <"$WORK/summary"
exit
}
