"""Model compression on the real model and real photos: INT8 quantization served by the real inference
service, the quality gate at publish, evaluation through the command (the quantizer's logic on tiny
synthetic models is in tests/unit/test_quantize.py)."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort

from edgefleet import photos
from edgefleet.models import dataset
from edgefleet.models.quantize import Mode, quantize
from shared.manifest import load_verified


def test_static_int8_is_smaller_agrees_and_is_served(data, model_dir, tmp_path, broker, start_inference):
    out = tmp_path / "int8"
    manifest, report = quantize(model_dir, out, Mode.STATIC, data / "eval", data / "calibration", gate=0.5)
    parent, _ = load_verified(model_dir)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert manifest.size_bytes < 0.35 * parent.size_bytes
    assert manifest.parent_sha256 == parent.sha256 and manifest.recipe["per_channel"] == "true"
    assert manifest.quality.samples == 24 and manifest.quality.value >= 0.7 and manifest.quality.passed
    assert "Add" in report.left_in_float()
    # The inference service serves it: a real photo still gets its class.
    _, device = start_inference(broker, model_dir=str(out))
    device.publish_envelope("cam", "int8-1", photos.jpeg("coffee"))
    prediction = device.prediction_for("int8-1")
    assert prediction.model.sha256 == manifest.sha256 and prediction.top[0].label in {"espresso", "cup", "coffee mug"}


def test_a_model_below_the_gate_is_marked_failed_and_cannot_be_published(data, model_dir, tmp_path, s3_server):
    import os
    import subprocess
    import sys

    import cv2
    import numpy as np

    from shared import s3
    from shared.registry import new_key_pair

    # Calibration data unlike production: one flat grey frame gives ranges that crush every real image.
    unlike = tmp_path / "grey"
    unlike.mkdir()
    cv2.imwrite(str(unlike / "grey.jpg"), np.full((300, 300, 3), 128, np.uint8))
    made = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "quantize", "--parent", str(model_dir), "--out",
         str(tmp_path / "int8"), "--calibration", str(unlike), "--eval", str(data / "eval"), "--max-float-layers", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert made.returncode == 0, made.stderr[-3000:]
    manifest, _ = load_verified(tmp_path / "int8")
    assert manifest.quality.passed is False and manifest.quality.threshold == 0.97
    # The command says so plainly, and why: not a line to miss among the figures.
    assert "WARNING: efficientnet-lite0-int8-static-minmax is not publishable" in made.stderr
    assert "below the gate 97%" in made.stderr and "--max-float-layers 0" in made.stderr
    # ...and its last line sums it up: what was made from what, its size against the parent's, the verdict.
    summary = made.stderr.splitlines()[-1]
    assert summary.startswith(f"quantized {model_dir.name} → {tmp_path / 'int8'}: ") and "(was " in summary
    assert "✗ FAILED, not publishable" in summary and summary.endswith(" s")
    keys = new_key_pair(tmp_path / "keys")
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "publish", str(tmp_path / "int8"), "--key", str(keys.private)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **s3_server.env()},
    )
    assert result.returncode == 1 and "refused" in result.stderr and "failed its quality gate" in result.stderr
    store = s3.client(s3_server.settings())
    assert store.list_buckets()["Buckets"] == [] or store.list_objects_v2(Bucket="edgefleet-models")["KeyCount"] == 0


def test_mixed_precision_chooses_on_half_the_held_out_set_and_only_the_other_half_gates(data, model_dir, tmp_path):
    from edgefleet.models.derive import top1_agreement
    from edgefleet.models.frames import load_inputs
    from edgefleet.models.outputs import logits

    manifest, report = quantize(model_dir, tmp_path / "int8", Mode.STATIC, data / "eval", data / "calibration",
                                gate=0.5, max_float_layers=2)
    # All-INT8 already meets 0.5 on the selection half (the even images): no layer kept in float.
    assert report.selection_samples == 12 and report.selection_agreement >= 0.5 and report.float_layers == []
    assert "12 held-out images (every other one)" in manifest.recipe["float_layer_selection"]
    # The gate is the odd images' agreement alone, measured again here.
    parent, parent_path = load_verified(model_dir)
    odd = load_inputs(data / "eval", parent)[1::2]
    expected = top1_agreement(logits(parent_path, parent.input.name, odd),
                              logits(tmp_path / "int8" / "model.onnx", parent.input.name, odd))
    assert manifest.quality.samples == 12 and manifest.quality.value == round(expected, 4)
    assert "gate half" in manifest.quality.measured_on


def test_dynamic_int8_loads_and_agrees_above_a_floor(data, model_dir, tmp_path):
    manifest, _ = quantize(model_dir, tmp_path / "dyn", Mode.DYNAMIC, data / "eval")
    assert manifest.recipe["mode"] == "dynamic"
    ort.InferenceSession(str(tmp_path / "dyn" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert manifest.quality.value >= 0.25  # measured 0.48 on 300 images: reported as it is, gate failed


def test_evaluate_writes_table_json_markdown_and_plot_with_accuracy_where_labels_exist(data, model_dir, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    held_out = tmp_path / "eval"
    shutil.copytree(data / "eval", held_out)
    (held_out / "tabby").mkdir()  # four frames with a true label: a sub-folder named after the class
    for i, crop in enumerate(dataset.crops_of("chelsea", 4, seed=11)):
        (held_out / "tabby" / f"chelsea-{i}.jpg").write_bytes(crop)
    out = {k: tmp_path / f"eval.{k}" for k in ("json", "md", "png")}
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "evaluate", str(model_dir), "--eval", str(held_out),
         "--json", str(out["json"]), "--markdown", str(out["md"]), "--plot", str(out["png"])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("evaluated 1 model(s) on 28 held-out images: ") and str(out["png"]) in summary
    (row,) = json.loads(out["json"].read_text())
    assert row["top1_agreement"] == 1.0 and row["samples"] == 28 and row["p99_ms"] >= row["p50_ms"]
    assert row["labelled_samples"] == 4 and 0.0 <= row["accuracy"] <= 1.0
    assert out["md"].read_text().startswith("| model |")
    assert out["png"].read_bytes().startswith(b"\x89PNG")
