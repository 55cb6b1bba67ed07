#!/usr/bin/env bash
# Fills var/ in the current folder with what docker-compose.yml mounts, once: the model, the operator's
# signing key, the fleet's CA and certificates, the device broker's users and bridge, the S3 store's
# root keys. Steps already done are kept. Run it from the folder that holds docker-compose.yml.
#   DEVICE=device-1 CAMERAS=cam-1 LAN_HOSTS=device-1.lan,192.168.1.20 scripts/compose-init.sh
# Then, with the cloud profile up: scripts/compose-init.sh --device-key (the device's own S3 key, which
# can only read models/*; edgefleet s3 device-key through the store's IAM API, with the root keys).
#
# File modes: compose mounts each file into its container as is (a bind mount, outside a swarm), and the
# services run as uid 10001, Mosquitto as 1883, so the mounted files are world-readable; var/ itself is
# 0700, so on this machine only its owner reaches them. The CA's private key (var/certs/ca.key) and the
# operator's keys (var/keys/operator.key, var/certs/operator.key) are never mounted and stay 0600.
set -euo pipefail
EDGEFLEET=${EDGEFLEET:-edgefleet}
DEVICE=${DEVICE:-device-1}
CAMERAS=${CAMERAS:-cam-1}
say() { printf '\033[1m[compose-init]\033[0m %s\n' "$*" >&2; }

readable() { find "$@" -type d -exec chmod 755 {} +; find "$@" -type f -exec chmod 644 {} +; }

if [ "${1:-}" = --device-key ]; then
  EDGEFLEET_S3_ENDPOINT_URL=${S3_URL:-http://127.0.0.1:9000} EDGEFLEET_S3_ACCESS_KEY_ID=$(cat var/s3/access-key) \
    EDGEFLEET_S3_SECRET_ACCESS_KEY=$(cat var/s3/secret-key) "$EDGEFLEET" s3 device-key "$DEVICE" --out "var/s3/$DEVICE"
  readable "var/s3/$DEVICE"
  exit 0
fi

mkdir -p var && chmod 700 var
"$EDGEFLEET" model build --out var/models/efficientnet-lite0 >/dev/null
[ -f var/keys/operator.pub ] || "$EDGEFLEET" keys new --out var/keys
[ -f var/certs/ca.crt ] || "$EDGEFLEET" certs ca --out var/certs
[ -f var/certs/cloud-broker.crt ] || "$EDGEFLEET" certs issue cloud-broker --server --hosts cloud-broker,localhost --out var/certs
[ -f "var/certs/$DEVICE.crt" ] || "$EDGEFLEET" certs issue "$DEVICE" --out var/certs
# The cameras' TLS listener (8884): a server certificate for the names cameras reach the device by.
[ -f "var/certs/$DEVICE-lan.crt" ] || "$EDGEFLEET" certs issue "$DEVICE-lan" --server --hosts "${LAN_HOSTS:-localhost,127.0.0.1}" --out var/certs
[ -f var/certs/cloud-ingest-1.crt ] || "$EDGEFLEET" certs issue --service cloud-ingest-0 cloud-ingest-1 operator --out var/certs
# The fleet console's client certificate (common name `console`, its block in deploy/mosquitto/cloud.acl).
[ -f var/certs/console.crt ] || "$EDGEFLEET" certs issue --service console --out var/certs
[ -f var/broker/passwords ] || "$EDGEFLEET" broker passwords --cameras "$CAMERAS" --out var/broker/passwords
[ -f "var/broker/bridge/$DEVICE.conf" ] || { mkdir -p var/broker/bridge; "$EDGEFLEET" broker bridge "$DEVICE" --host cloud-broker --out "var/broker/bridge/$DEVICE.conf"; }
if [ ! -f var/s3/secret-key ]; then
  mkdir -p var/s3
  say "new S3 root keys in var/s3"
  python3 -c 'import secrets; print("edgefleet-root", end="")' >var/s3/access-key
  python3 -c 'import secrets; print(secrets.token_urlsafe(30), end="")' >var/s3/secret-key
fi

# What containers mount: readable by their users (see above); the signing keys stay private.
readable var/certs var/broker var/s3 var/models
chmod 644 var/keys/operator.pub
# Never mounted: the CA's and the operator's private keys (signing, and publishing rollouts) stay 0600.
chmod 600 var/certs/ca.key var/certs/operator.key var/keys/operator.key
say "var/ is ready for docker compose (device $DEVICE, cameras $CAMERAS)"
