#!/usr/bin/env bash
# The main job: set up, then run the whole edge stack locally (a spawned broker, the inference
# service and a camera simulator) with live predictions in the terminal. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edgefleet up "$@"
