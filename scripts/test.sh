#!/usr/bin/env bash
# Sets up, then runs the whole test suite against real brokers, the real model and real photos, and
# the shipped images and compose stack on a Docker engine it starts when none runs (scripts/engine.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/engine.sh
exec .venv/bin/python -m pytest "$@"
