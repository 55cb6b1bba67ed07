#!/usr/bin/env bash
# Builds the images the compose stack and the k3s manifests run: the project's own (one Dockerfile
# target per service) and, where the public base images cannot be pulled, local stand-ins for them.
#
# Stand-ins (Docker Hub is not reachable from the machines this project is built on; Debian's
# packages are): each is made from Debian bookworm packages with mmdebstrap and `docker import`,
# labelled io.edgefleet.standin, and made only when no image of that tag exists, so a real pulled
# image is never replaced.
#   python:3.11-slim       Debian's python3 (3.11, as in the real tag) with pip and venv, with this machine's CA
#                          bundle so pip reaches the registries during `docker build`
#   eclipse-mosquitto:2.0  Debian's mosquitto 2.0 laid out as the real image: /mosquitto/{config,data,log},
#                          user mosquitto with uid 1883, started as root and dropping to that user
#   edgefleet/s3-standin   moto in server mode, speaking MinIO's command line and root-key files, with
#                          IAM policies enforced (edgefleet/s3server.py); minio/minio ships no package
#
# Usage: scripts/images.sh [--standins-only] [TARGET...]   (targets default to every service)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[images]\033[0m %s\n' "$*" >&2; }
STANDIN_LABEL=io.edgefleet.standin
TARGETS=(inference sync telemetry cloud-ingest console camera)
TAG=${EDGEFLEET_IMAGE_TAG:-latest}
SUITE=bookworm

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# $1 tag, $2 comma-separated packages, $3... extra mmdebstrap options; then `docker import` changes in CHANGES.
standin() {
  local tag=$1 packages=$2; shift 2
  if have_image "$tag"; then return; fi
  say "making a stand-in for $tag from Debian $SUITE ($packages)"
  local tarball
  tarball=$(mktemp --suffix=.tar)
  # Docs, man pages and locales are dropped as the slim images drop them (-70 MB).
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$@" "$SUITE" "$tarball"
  local changes=()
  for change in "${CHANGES[@]}"; do changes+=(--change "$change"); done
  docker import "${changes[@]}" --change "LABEL $STANDIN_LABEL=debian-$SUITE" "$tarball" "$tag" >/dev/null
  rm -f "$tarball"
}

python_standin() {
  CHANGES=('ENV LANG=C.UTF-8' 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
           'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt'
           'CMD ["python3"]')
  # The real tag's pip installs system-wide; Debian marks its python externally managed (PEP 668).
  standin python:3.11-slim python3,python3-pip,python3-venv,ca-certificates \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
    --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED; ln -sf python3 "$1"/usr/bin/python'
}

mosquitto_standin() {
  CHANGES=('ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
           'ENTRYPOINT ["/docker-entrypoint.sh"]'
           'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]')
  standin eclipse-mosquitto:2.0 mosquitto,mosquitto-clients,netcat-openbsd \
    --customize-hook='chroot "$1" groupmod -g 1883 mosquitto; chroot "$1" usermod -u 1883 -g 1883 mosquitto' \
    --customize-hook='mkdir -p "$1"/mosquitto/config "$1"/mosquitto/data "$1"/mosquitto/log' \
    --customize-hook='copy-in deploy/standins/mosquitto/docker-entrypoint.sh /' \
    --customize-hook='copy-in deploy/standins/mosquitto/mosquitto.conf /mosquitto/config' \
    --customize-hook='chroot "$1" chown -R mosquitto:mosquitto /mosquitto'
}

build_target() {
  say "building edgefleet/$1:$TAG"
  docker build --quiet --network host --target "$1" -t "edgefleet/$1:$TAG" . >/dev/null
}

s3_standin() {
  say "building edgefleet/s3-standin:$TAG (moto server standing in for MinIO)"
  docker build --quiet --network host -f deploy/standins/s3.Dockerfile -t "edgefleet/s3-standin:$TAG" . >/dev/null
}

main() {
  local only=""
  if [ "${1:-}" = --standins-only ]; then only=1; shift; fi
  python_standin
  mosquitto_standin
  [ -n "$only" ] && return
  local targets=("$@")
  [ ${#targets[@]} -eq 0 ] && targets=("${TARGETS[@]}")
  for target in "${targets[@]}"; do build_target "$target"; done
  s3_standin
}

main "$@"
