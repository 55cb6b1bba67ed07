"""`edgefleet model cascade` end to end on the real FP32 model and its static INT8, over the 24 held-out
real-photo crops: the command writes a cascade folder that verifies whole (both members pinned), its
manifest's quality gate and recipe (the 2-fold cross-check), the curve as a table, a PNG and a CSV, and
a one-line summary. The threshold's choice itself is checked in tests/unit/test_cascade_choice.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from edgefleet.models.derive import gate_target
from shared.cascade import is_cascade, load_members, read_spec, verify_folder
from shared.manifest import load_verified


def test_model_cascade_writes_a_verified_cascade_its_gate_and_its_curve(data, model_dir, int8_dir, tmp_path):
    int8 = int8_dir  # the session's static INT8 (tests/conftest.py), read only
    out = tmp_path / "lite0-cascade"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "cascade", str(int8), str(model_dir), "--eval",
         str(data / "eval"), "--out", str(out), "--gate", "0.95", "--name", "lite0-cascade", "--version", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = verify_folder(out)
    assert is_cascade(manifest) and (manifest.name, manifest.version) == ("lite0-cascade", 3)
    spec, members = load_members(out, manifest)
    fp32, _ = load_verified(model_dir)
    assert [m.sha256 for m, _ in members] == [load_verified(int8)[0].sha256, fp32.sha256]
    assert spec.metric == "margin" and 0 <= spec.threshold <= 1 and read_spec(out / "cascade.json") == spec
    quality = manifest.quality
    assert quality.samples == 24 and quality.threshold == 0.95 and quality.passed == (quality.value >= 0.95)
    assert "2-fold" in quality.measured_on
    assert {"cross_check_even", "cross_check_odd", "in_sample", "chosen_on"} <= set(manifest.recipe)
    # The curve: a PNG, every threshold in the CSV (the chosen one marked), and a table on the terminal.
    png, table = tmp_path / "lite0-cascade-curve.png", tmp_path / "lite0-cascade-curve.csv"
    assert png.read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) >= 2 and sum(int(r["chosen"]) for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"] == "1")
    assert float(chosen["threshold"]) == float(f"{spec.threshold:.6g}") and float(chosen["agreement"]) >= 0.95
    # Chosen one standard error above the gate (so the gate holds on images it did not see): the cheapest row
    # reaching that, every cheaper one short of it.
    target = gate_target(0.95, 24)
    assert 0.95 < target and float(chosen["agreement"]) >= target
    assert all(float(r["agreement"]) < target for r in rows if float(r["ms_batch1"]) < float(chosen["ms_batch1"]))
    assert "chosen" in result.stderr and "escalated" in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("lite0-cascade v3:")]
    assert len(summary) == 1 and "cross-checked" in summary[0] and str(out) in summary[0]
    assert ("WARNING" in result.stderr) == (not quality.passed)
