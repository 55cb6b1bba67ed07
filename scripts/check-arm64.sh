#!/usr/bin/env bash
# Proves the runtime images build on arm64 without compiling: every runtime dependency must resolve
# to a linux/aarch64 wheel (or a pure-Python one) for CPython 3.11. Downloads to a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=$(.venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mapfile -t requirements <<< "$deps"
.venv/bin/pip download --quiet --only-binary=:all: --implementation cp --python-version 3.11 \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  -d "$out" "${requirements[@]}"
ls "$out" | grep -E "aarch64|none-any" | sed 's/^/  /'
echo "every runtime dependency has an aarch64 or pure-Python wheel"
