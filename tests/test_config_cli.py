"""The service command's side of config: `edgefleet inference` fails fast naming the bad key, and
--help documents every key (each a real child process; the pure `load()` checks are in
tests/unit/test_config.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from shared.config import InferenceSettings, keys

# The child reads only what the test gives it, not an EDGEFLEET_* key of the shell that runs the tests.
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}


def test_the_service_command_fails_fast_naming_the_key():
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "inference"],
        env={**CLEAN, "EDGEFLEET_MAX_BATCH": "-3"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "max_batch" in result.stderr and "EDGEFLEET_MAX_BATCH" in result.stderr


def test_help_documents_every_key():
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "inference", "--help"], capture_output=True, text=True, timeout=60,
        env={**CLEAN, "COLUMNS": "200"},
    )
    assert result.returncode == 0
    for name in keys(InferenceSettings):
        assert f"EDGEFLEET_{name.upper()}" in result.stdout, name
