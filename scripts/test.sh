#!/usr/bin/env bash
# Sets up, checks lint and types, then runs the whole test suite against real brokers, the real model
# and real photos, and the shipped images and compose stack on a Docker engine it starts when none
# runs (scripts/engine.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/engine.sh
scripts/test-tools.sh
# The checkers first: a lint or type error fails the run before twenty minutes of tests (pyproject.toml
# says what each checks: ruff over the tree, mypy strict on shared/ and services/).
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
