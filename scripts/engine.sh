#!/usr/bin/env bash
# What the container tests need: a Docker engine (Debian's docker.io, started here when none runs),
# docker-compose, mmdebstrap for the base-image stand-ins (scripts/images.sh) and kubectl for rendering
# the k3s overlays. Each is installed only where missing; root here, sudo elsewhere.
# The engine it starts has no bridge and no iptables rules: containers use the host's network only,
# so none takes a private-range address and the tests' traffic stays on loopback.
set -euo pipefail

say() { printf '\033[1m[engine]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian's ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap >/dev/null
fi

if ! as_root docker info >/dev/null 2>&1; then
  say "starting dockerd (host networking only; log: /var/log/edgefleet-dockerd.log)"
  as_root sh -c 'nohup dockerd --bridge=none --iptables=false --ip6tables=false >/var/log/edgefleet-dockerd.log 2>&1 &'
  for _ in $(seq 60); do as_root docker info >/dev/null 2>&1 && break; sleep 1; done
  as_root docker info >/dev/null 2>&1 || { say "dockerd did not start: see /var/log/edgefleet-dockerd.log"; exit 1; }
fi
