#!/bin/sh
# As eclipse-mosquitto's own entrypoint: started as root, hand /mosquitto's writable parts to the
# broker's user (uid 1883), which mosquitto drops to after binding its ports.
set -e
if [ "$(id -u)" = 0 ]; then
  chown -R mosquitto:mosquitto /mosquitto/data /mosquitto/log 2>/dev/null || true
fi
exec "$@"
