#!/usr/bin/env bash
# The main job: set up, then run the whole fleet locally without Docker (a TLS fleet broker, an S3
# store, cloud_ingest, and two devices each with its broker, sync, inference, telemetry and cameras),
# shown live in the terminal. Ctrl-C stops it all. Options go to `edgefleet fleet` (--devices, --rate).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edgefleet fleet "$@"
