#!/usr/bin/env bash
# The CPU image (Dockerfile) built and served end to end on this machine, as root:
#   bash scripts/check_image.sh            # after `make demo` (the demo model is mounted into the container)
#   NO_CACHE=1 bash scripts/check_image.sh # the build from scratch (its seconds are then the cold build's)
# Installs docker.io and debootstrap when absent, starts dockerd when none runs (and stops only that one),
# makes a Debian bookworm base with debootstrap (no image registry needed: BASE_IMAGE names another), builds
# the image, runs it with the demo model mounted and its port published on 127.0.0.1 only, then
# scripts/check_image.py checks it (health, JSON, SSE, cancel, 10 at once, docker stop mid-answer, restart)
# and writes benchmarks/DATE-cpu-image-check.json. Exits non-zero on any failure. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-llama-pkg-cpu:check}
BASE_IMAGE=${BASE_IMAGE:-llama-pkg-base:bookworm}
NAME=llama-pkg-check
PORT=${PORT:-5099}
OUT=${OUT:-benchmarks/$(date -u +%F)-cpu-image-check.json}
DEMO=weights/smollm2-135m-instruct

[ "$(id -u)" = 0 ] || { echo "error: run as root: it installs docker.io and debootstrap and starts dockerd" >&2; exit 1; }
[ -f "$DEMO/config.json" ] || { echo "error: no demo model at $DEMO: run \`make demo\` first" >&2; exit 1; }
if find "$DEMO" -type f ! -perm -a=r | grep -q .; then  # the container's user reads the mounted folder
  echo "making $DEMO readable to the container's user (chmod -R a+rX)"
  chmod -R a+rX "$DEMO"
fi
for tool in dockerd:docker.io debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || { echo "installing ${tool#*:}"; apt-get install -y -q "${tool#*:}" >/dev/null; }
done

started=""
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  if [ -n "$started" ]; then kill "$started" 2>/dev/null || true; wait "$started" 2>/dev/null || true; fi
  rm -f docker/wheels/*.whl docker/wheels/host-ca.crt
}
trap cleanup EXIT
if ! docker info >/dev/null 2>&1; then
  dockerd >/tmp/check-image-dockerd.log 2>&1 &
  started=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "error: dockerd did not start: /tmp/check-image-dockerd.log" >&2; exit 1; }
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  root=$(mktemp -d)
  echo "making $BASE_IMAGE with debootstrap (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >/tmp/check-image-debootstrap.log
  tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
fi

# torch's CPU build from this machine's wheelhouse when there is one (PyTorch's index may be out of reach),
# and this machine's CA bundle for pip (a proxy may inspect TLS)
build_args=(--build-arg "BASE=$BASE_IMAGE")
wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  cp "$wheel" docker/wheels/
  build_args+=(--build-arg "TORCH=/src/docker/wheels/$(basename "$wheel")" --build-arg "TORCH_INDEX=https://pypi.org/simple")
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt docker/wheels/host-ca.crt
  build_args+=(--build-arg "PIP_CERT=/src/docker/wheels/host-ca.crt")
fi
echo "building $IMAGE"
t0=$(date +%s.%N)
[ -n "${NO_CACHE:-}" ] && build_args+=(--no-cache)
docker build --network host -q "${build_args[@]}" -t "$IMAGE" . >/dev/null
build_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")

docker rm -f "$NAME" >/dev/null 2>&1 || true
.venv/bin/python scripts/check_image.py --image "$IMAGE" --name "$NAME" --port "$PORT" \
  --demo "$PWD/$DEMO" --build-seconds "$build_s" --build-cache "$([ -n "${NO_CACHE:-}" ] && echo none || echo used)" \
  --out "$OUT"
