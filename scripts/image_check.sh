#!/usr/bin/env bash
# Build the Dockerfile with a real engine and serve one step through the image.
#
#   scripts/image_check.sh                 # docker, else buildah (+ podman or chroot to run)
#   ENGINE=buildah scripts/image_check.sh
#
# Optional, for machines without registry or PyPI-index access (each also works alone):
#   BASE_ROOTFS=/path/to/rootfs   a Debian bookworm root with python3, python3-venv and
#                                 python3-dev (the official base carries Python's headers, which
#                                 the C++ kernel's build includes), e.g. `debootstrap
#                                 --variant=minbase --include=python3,python3-venv,python3-pip,
#                                 python3-dev bookworm DIR`, imported as the pinned base image
#   WHEELS=/path/to/wheels        wheels pip may take from (torch's CPU wheel and its
#                                 dependencies when download.pytorch.org is unreachable)
#   RUN_AS=chroot                 run the image from its mounted root file system, for hosts
#                                 where no container runtime can start (rlimits refused...)
# Prints the time each phase took. Exit status 0: the image served a step.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-$(command -v docker >/dev/null && echo docker || echo buildah)}
TAG=${TAG:-optserve:cpu-check}
PORT=${PORT:-18000}
work=$(mktemp -d)
t0=$(date +%s)
phase() { echo "== $1 ($(( $(date +%s) - t0 )) s so far)"; }

base=$(awk '/^FROM /{print $2; exit}' Dockerfile)
if [[ -n "${BASE_ROOTFS:-}" ]]; then
  phase "importing $BASE_ROOTFS as $base"
  ln -sf /usr/bin/python3 "$BASE_ROOTFS/usr/local/bin/python"
  tar -C "$BASE_ROOTFS" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "docker.io/library/$base" >/dev/null
fi

# Stage names chosen by ARG (FROM torch-${TORCH_VARIANT}) are not resolved by older buildah
# (1.28: "short-name torch-cpu did not resolve"); the CPU variant is spelled out for it.
sed -E 's/^(FROM [a-z-]+)-\$\{TORCH_VARIANT\}/\1-cpu/' Dockerfile > "$work/Containerfile"

phase "building $TAG with $ENGINE"
build=()
if [[ -n "${WHEELS:-}" ]]; then
  printf '[global]\nfind-links = /wheels\nretries = 0\ntimeout = 20\n' > "$work/pip.conf"
  build+=(-v "$WHEELS:/wheels:ro" -v "$work/pip.conf:/etc/pip.conf:ro")
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then  # the host's trust store, for PyPI
    printf 'cert = /host-ca.crt\n' >> "$work/pip.conf"
    build+=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro)
  fi
fi
case "$ENGINE" in
  docker) docker build -f "$work/Containerfile" -t "$TAG" . ;;
  buildah) buildah bud --isolation chroot --network host --format docker --layers \
             "${build[@]}" -f "$work/Containerfile" -t "$TAG" . ;;
  podman) podman build --format docker --network host "${build[@]}" \
            -f "$work/Containerfile" -t "$TAG" . ;;
esac
phase "built"

cleanup() {
  [[ -n "${cid:-}" ]] && { "${RUNNER}" rm -f "$cid" >/dev/null 2>&1 || true; }
  [[ -n "${pid:-}" ]] && { kill "$pid" 2>/dev/null || true; }
  [[ -n "${ctr:-}" ]] && { buildah umount "$ctr" >/dev/null 2>&1 || true;
                           buildah rm "$ctr" >/dev/null 2>&1 || true; }
  rm -rf "$work"
}
trap cleanup EXIT

if [[ "${RUN_AS:-}" == chroot ]]; then
  # The image's own files, ENV, user and CMD, without a container runtime.
  ctr=$(buildah from "$TAG")
  root=$(buildah mount "$ctr")
  env_args=()
  while IFS= read -r kv; do env_args+=("$kv"); done < <(
    buildah inspect --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$TAG" | sed '/^$/d')
  cmd=$(buildah inspect --format '{{index .OCIv1.Config.Cmd 2}}' "$TAG")
  user=$(buildah inspect --format '{{.OCIv1.Config.User}}' "$TAG")
  mount --bind /proc "$root/proc"; mount --bind /dev "$root/dev"
  trap 'umount "$root/proc" "$root/dev" 2>/dev/null || true; cleanup' EXIT
  phase "starting the image's CMD in a chroot as $user"
  env -i "${env_args[@]}" OPTSERVE_PORT="$PORT" OPTSERVE_HOST=127.0.0.1 \
    chroot --userspec="$user" "$root" sh -c "cd /home/optserve && $cmd" &
  pid=$!
else
  RUNNER=$([[ "$ENGINE" == docker ]] && echo docker || echo podman)
  phase "starting the image with $RUNNER"
  cid=$("$RUNNER" run -d -p "127.0.0.1:$PORT:8000" "$TAG")
fi

for _ in $(seq 240); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
phase "ready"
sid=$(curl -fsS -X POST "http://127.0.0.1:$PORT/v1/sessions" -H 'Content-Type: application/json' \
  -d '{"params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, -1.0]}}}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
out=$(curl -fsS -X POST "http://127.0.0.1:$PORT/v1/sessions/$sid/step" \
  -H 'Content-Type: application/json' -H 'Accept: application/json' \
  -d '{"tensors": {"w": {"dtype": "float32", "shape": [2], "data": [0.1, 0.2]}}}')
echo "$out"
phase "a step served through the image"
if [[ "${RUN_AS:-}" == chroot ]]; then  # what the kernels compiled at start-up need
  chroot --userspec="$user" "$root" env -i "${env_args[@]}" sh -c 'cd /tmp && python -c "
import time, torch
from torch.utils.cpp_extension import load_inline
t = time.time()
m = load_inline(\"probe\", cpp_sources=\"int one() { return 1; }\", functions=[\"one\"],
                build_directory=\"/tmp\")
print(\"load_inline:\", m.one(), round(time.time() - t, 1), \"s\")
t = time.time()
f = torch.compile(lambda x: x * 2 + 1)
print(\"torch.compile (CPU):\", f(torch.ones(3)).tolist(), round(time.time() - t, 1), \"s\")
"'
  phase "the image compiled a C++ extension and a torch.compile kernel"
fi
