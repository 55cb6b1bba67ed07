"""Every benchmark runs as `edgefleet bench <name> --quick --json FILE` and writes its goals. (What the
figures are is the benchmarks' business; here only that they run and say what they measured.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["pipeline", "compression", "ep", "swap", "telemetry", "overload"])
def test_bench_quick_writes_its_goals(name, model_dir, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "bench", name, "--quick", "--json", str(out),
         *(["--model-dir", str(model_dir)] if name != "telemetry" else [])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["bench"] == name and document["quick"] is True and document["rows"]
    assert document["goals"]
    for goal in document["goals"]:
        assert set(goal) >= {"name", "value", "target", "unit", "met"}
        assert isinstance(goal["met"], bool) and isinstance(goal["value"], (int, float))
    assert "goals" in result.stdout
    if name == "ep":  # this machine has no GPU: CUDA and TensorRT must be reported as fallbacks
        rows = {r["requested"]: r for r in document["rows"]}
        assert rows["CUDAExecutionProvider"]["fell back"] and rows["CPUExecutionProvider"]["fell back"] is False
        assert "FALLBACK: CUDAExecutionProvider" in result.stdout and document["goals"][0]["met"]
