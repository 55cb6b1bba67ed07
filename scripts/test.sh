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
# Two workers (pytest-xdist); tests/conftest.py keeps the tests that need the images in one group, run in
# order by one worker. Arguments after the script's name go to pytest (`-n 0`: one process).
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
