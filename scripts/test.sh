#!/usr/bin/env bash
# Sets up, then runs the whole test suite against real brokers, the real model and real photos.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
