#!/usr/bin/env bash
# Sets up a fresh Debian machine for edgefleet: Mosquitto, a virtual environment with every package,
# and the model built once. Each step is skipped when it is already done, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null; then
  say "installing Debian's mosquitto and mosquitto-clients"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the package list changed.
stamp=.venv/.edgefleet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (torch only for the one-time model build)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[build,photos,dev]"
  echo "$want" >"$stamp"
fi

scripts/plugins.sh  # the WebAssembly plugins (plugins/, tests/plugins/) from source; unchanged ones are skipped

# Builds EfficientNet-Lite0 to ONNX once; a cached, verified model is kept.
.venv/bin/edgefleet model build
