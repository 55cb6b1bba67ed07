"""Pruning and distillation on the real EfficientNet-Lite0 and real photos (brief training runs: what
is tested is that channels really go, zeros really appear, and the student really learns)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgefleet.models import dataset
from edgefleet.models.cost import cost
from edgefleet.models.distill import Training, distill
from edgefleet.models.prune import UNSTRUCTURED_NOTE, prune
from shared.manifest import ModelError, load_verified

BRIEF = Training(epochs=1, batch=8)


def _conv_shapes(path):
    model = onnx.load(str(path))
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [tuple(weights[n.input[1]]) for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]


def test_structured_pruning_removes_channels_and_exports_a_smaller_dense_model(data, model_dir, tmp_path):
    manifest, report = prune(model_dir, tmp_path / "pruned", data / "calibration", data / "eval", 0.2, training=BRIEF)
    parent, parent_path = load_verified(model_dir)
    before, after = _conv_shapes(parent_path), _conv_shapes(tmp_path / "pruned" / "model.onnx")
    assert len(before) == len(after)
    assert sum(a[0] < b[0] for a, b in zip(after, before, strict=True)) >= 16, "the blocks' expanded channels are gone"
    assert report.after.cost.parameters < 0.93 * report.before.cost.parameters
    assert report.after.cost.macs < 0.9 * report.before.cost.macs
    assert report.after.size_bytes < parent.size_bytes and report.structured and not report.note
    assert manifest.output.shape == ["batch", 1000] and manifest.parent_sha256 == parent.sha256
    assert "Taylor" in manifest.recipe["method"] and manifest.recipe["epochs"] == "1"
    assert manifest.quality.samples == 24 and manifest.quality.value >= 0.2 and not manifest.quality.passed


def test_unstructured_pruning_zeroes_weights_keeps_shapes_and_says_it_saves_nothing(data, model_dir, tmp_path):
    out = tmp_path / "zeros"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "prune", "--unstructured", "--ratio", "0.3", "--epochs", "1",
         "--batch", "8", "--parent", str(model_dir), "--out", str(out), "--frames", str(data / "calibration"),
         "--eval", str(data / "eval")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "NOTE: unstructured pruning only zeroes weights" in result.stderr and "zero weights" in result.stderr
    _, parent_path = load_verified(model_dir)
    manifest, path = load_verified(out)
    assert _conv_shapes(path) == _conv_shapes(parent_path)
    pruned, original = cost(path), cost(parent_path)
    assert pruned.macs == original.macs
    assert pruned.zero_parameters > original.zero_parameters + 0.25 * original.parameters
    assert manifest.recipe["note"] == UNSTRUCTURED_NOTE


def test_distilled_student_is_smaller_and_learns_from_soft_and_true_labels(data, model_dir, tmp_path):
    frames = tmp_path / "frames"
    shutil.copytree(data / "calibration", frames)
    tabby = frames / "tabby"  # a true label: a sub-folder named after one of the model's classes
    tabby.mkdir()
    for i, crop in enumerate(dataset.crops_of("chelsea", 4, seed=7)):
        (tabby / f"chelsea-{i}.jpg").write_bytes(crop)
    manifest, report = distill(model_dir, tmp_path / "student", frames, data / "eval", 5, Training(epochs=2, batch=8))
    assert report.fit.labelled_frames == 4 and report.fit.frames == 20
    assert report.fit.last_loss < report.fit.first_loss
    assert report.after.parameters < report.before.parameters and report.after.macs < 0.8 * report.before.macs
    assert len(_conv_shapes(tmp_path / "student" / "model.onnx")) < len(_conv_shapes(load_verified(model_dir)[1]))
    assert "without residual blocks [2, 4, 7, 10, 14]" in manifest.recipe["student"]
    assert manifest.recipe["temperature"] == "4.0" and "4 with true labels" in manifest.recipe["frames"]
    assert manifest.quality.value >= 0.2


def test_pruning_refuses_a_parent_whose_weights_it_does_not_hold(data, int8_dir, tmp_path):
    with pytest.raises(ModelError, match="not the float efficientnet-lite0"):  # its static INT8
        prune(int8_dir, tmp_path / "pruned", data / "calibration", data / "eval", training=BRIEF)


def test_bad_training_settings_are_clear_errors(data, model_dir, tmp_path):
    with pytest.raises(ValueError, match="ratio"):
        prune(model_dir, tmp_path / "p", data / "calibration", data / "eval", ratio=1.5)
    with pytest.raises(ValueError, match="residual blocks"):
        distill(model_dir, tmp_path / "d", data / "calibration", data / "eval", drop_blocks=12)
    with pytest.raises(FileNotFoundError):
        distill(model_dir, tmp_path / "d", tmp_path / "nowhere", data / "eval")
    assert np.isfinite(cost(load_verified(model_dir)[1]).macs)
