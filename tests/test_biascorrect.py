"""Bias correction of static INT8 on the real model and real-photo crops: only bias values change, and each
convolution's mean output moves to the float model's."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from edgefleet.models.biascorrect import _channel_means
from edgefleet.models.frames import load_inputs
from edgefleet.models.quantize import Mode, quantize
from shared.manifest import load_verified

# Calibration and correction frames, and held-out images for the gate. The correction runs the unoptimized
# QDQ model on every frame (each convolution's measurement re-runs only what its corrections above changed):
# 2 frames instead of the fixture's 16 keep it short, and prove the same.
FRAMES = 2
EVAL = 8


def test_bias_correction_changes_only_biases_and_brings_conv_means_to_float(data, model_dir, tmp_path):
    limits = {"gate": 0.5, "calibration_limit": FRAMES, "eval_limit": EVAL}
    plain, _ = quantize(model_dir, tmp_path / "plain", Mode.STATIC, data / "eval", data / "calibration", **limits)
    fixed, _ = quantize(model_dir, tmp_path / "fixed", Mode.STATIC, data / "eval", data / "calibration", **limits,
                        bias_correction=True)
    assert plain.recipe["bias_correction"] == "none"
    assert fixed.recipe["bias_correction"].startswith("49 convolutions")
    before, after = (onnx.load(str(tmp_path / d / "model.onnx")).graph for d in ("plain", "fixed"))
    # The same graph (so the same kernels and speed); initializers differ only in INT32 biases.
    assert [(n.op_type, list(n.input)) for n in before.node] == [(n.op_type, list(n.input)) for n in after.node]
    changed = [a.name for a, b in zip(before.initializer, after.initializer, strict=True)
               if (numpy_helper.to_array(a) != numpy_helper.to_array(b)).any()]
    assert changed and all(numpy_helper.to_array(b).dtype.name == "int32"
                           for b in after.initializer if b.name in changed)
    # The deepest convolution's per-channel means over the frames it was corrected on: closer to float's after.
    parent, parent_path = load_verified(model_dir)
    frames = load_inputs(data / "calibration", parent, FRAMES)
    conv = [n for n in after.node if n.op_type == "Conv"][-1]
    (float_conv,) = [n for n in onnx.load(str(parent_path)).graph.node if n.name == conv.name]
    (target,) = _channel_means(onnx.load(str(parent_path)), [float_conv.output[0]], parent.input.name, frames)
    gaps = [abs(_channel_means(onnx.load(str(tmp_path / d / "model.onnx")), [conv.output[0]], parent.input.name,
                               frames)[0] - target).mean() for d in ("plain", "fixed")]
    assert gaps[1] < gaps[0] / 2
