"""Model compression on the real model and real photos: dataset, INT8 quantization, quality gate."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet import photos
from edgefleet.models import dataset
from edgefleet.models.quantize import Mode, quantize
from edgefleet.models.store import install
from shared.manifest import ModelError, ModelManifest, Preprocessing, TensorSpec, load_verified


def _hashes(folder):
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_dataset_is_reproducible_disjoint_and_recorded(data, tmp_path):
    again = tmp_path / "again"
    dataset.make(again, eval_count=24, calibration_count=16)
    assert _hashes(data / "eval") == _hashes(again / "eval")
    assert not _hashes(data / "eval") & _hashes(data / "calibration")
    index = json.loads((data / dataset.INDEX_FILE).read_text())
    entry = index["splits"]["eval"]["images"][0]
    assert {"file", "source", "box", "flip", "scale"} <= set(entry) and entry["source"] in photos.EVALUATION


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

    from shared import s3
    from shared.registry import new_key_pair

    manifest, _ = quantize(model_dir, tmp_path / "int8", Mode.STATIC, data / "eval", data / "calibration", gate=1.01)
    assert manifest.quality.passed is False and manifest.quality.threshold == 1.01
    keys = new_key_pair(tmp_path / "keys")
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "publish", str(tmp_path / "int8"), "--key", str(keys.private)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **s3_server.env()},
    )
    assert result.returncode == 1 and "refused" in result.stderr and "failed its quality gate" in result.stderr
    store = s3.client(s3_server.settings())
    assert store.list_buckets()["Buckets"] == [] or store.list_objects_v2(Bucket="edgefleet-models")["KeyCount"] == 0


def test_dynamic_int8_loads_and_agrees_above_a_floor(data, model_dir, tmp_path):
    manifest, _ = quantize(model_dir, tmp_path / "dyn", Mode.DYNAMIC, data / "eval")
    assert manifest.recipe["mode"] == "dynamic"
    ort.InferenceSession(str(tmp_path / "dyn" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert manifest.quality.value >= 0.25  # measured 0.48 on 300 images: reported as it is, gate failed


def _save_classifier(nodes, initializers, folder):
    """A 32x32, 10-class ONNX model from these nodes, installed with a manifest under folder/model."""
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "staged.onnx"
    onnx.save(model, str(staged))
    return install(staged, _manifest_for(staged, 32), folder / "model")


def _tiny_model_with(op_type: str, folder):
    """A 32x32 classifier with a node the quantizer has no rule for, and its manifest."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(op_type, ["c1"], ["odd"], name="odd_node"),
        helper.make_node("GlobalAveragePool", ["odd"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2"], ["logits"], name="fc", transB=1),
    ]
    return _save_classifier(nodes, [w1, w2], folder)


def _manifest_for(staged, crop: int) -> ModelManifest:
    from shared.manifest import sha256_of

    return ModelManifest(
        name="tiny", version=1, sha256=sha256_of(staged), size_bytes=staged.stat().st_size, opset=17,
        input=TensorSpec(name="images", shape=["batch", 3, crop, crop], dtype="float32"),
        output=TensorSpec(name="logits", shape=["batch", 10], dtype="float32"),
        preprocessing=Preprocessing(resize_shorter=36, crop=crop, color_order="RGB", interpolation="linear",
                                    mean=[127.0] * 3, std=[128.0] * 3),
        labels=[f"class {i}" for i in range(10)], recipe={"source": "test"}, created_at=time.time(),
    )


def test_an_op_the_quantizer_cannot_handle_is_left_in_float_and_reported(data, tmp_path):
    _tiny_model_with("Sin", tmp_path / "tiny")
    manifest, report = quantize(tmp_path / "tiny" / "model", tmp_path / "int8", Mode.STATIC, data / "eval", data / "calibration", gate=0.0)
    assert ("odd_node", "Sin") in report.unsupported and "Sin x1" in manifest.recipe["left_in_float"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    assert any(n.op_type == "Sin" for n in graph.node) and any(n.op_type == "QuantizeLinear" for n in graph.node)
    session = ort.InferenceSession(str(tmp_path / "int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)


def test_a_non_onnx_or_tampered_input_is_a_clear_error(data, tmp_path):
    staged = tmp_path / "junk.onnx"
    staged.write_bytes(b"this is not an ONNX model")
    install(staged, _manifest_for(staged, 32), tmp_path / "junk")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        quantize(tmp_path / "junk", tmp_path / "out", Mode.STATIC, data / "eval", data / "calibration")
    (tmp_path / "junk" / "model.onnx").write_bytes(b"changed after the manifest was written")
    with pytest.raises(ModelError, match="bytes|SHA-256"):
        quantize(tmp_path / "junk", tmp_path / "out", Mode.STATIC, data / "eval", data / "calibration")


def _model_with_a_sensitive_layer(folder):
    """convA makes one channel 10^4 x larger and convB scales it back: the float model is unchanged,
    but quantizing the tensor between them per-tensor crushes its other seven channels to zero."""
    rng = np.random.default_rng(1)
    wa = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    wb = rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.3
    wa[0] *= 1e4
    wb[:, 0] *= 1e-4
    wc = rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.3
    wfc = rng.normal(size=(10, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, n) for w, n in ((wa, "wa"), (wb, "wb"), (wc, "wc"), (wfc, "wfc"))]
    nodes = [
        helper.make_node("Conv", ["images", "wa"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="convB"),
        helper.make_node("Conv", ["b", "wc"], ["c"], name="convC", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc"], ["logits"], name="fc", transB=1),
    ]
    return _save_classifier(nodes, inits, folder)


def test_the_sensitivity_pass_keeps_an_artificially_sensitive_layer_in_float(data, tmp_path):
    _model_with_a_sensitive_layer(tmp_path / "sensitive")
    parent = tmp_path / "sensitive" / "model"
    plain, _ = quantize(parent, tmp_path / "plain", Mode.STATIC, data / "eval", data / "calibration", gate=0.9)
    mixed, report = quantize(
        parent, tmp_path / "mixed", Mode.STATIC, data / "eval", data / "calibration", gate=0.9, max_float_layers=4
    )
    kept = [name for name, _, _ in report.float_layers]
    assert {"convA", "convB"} <= set(kept), report.float_layers
    assert "convC" not in kept and "fc" not in kept
    assert mixed.quality.value > plain.quality.value
    assert mixed.recipe["float_layers"] == ",".join(kept)


def test_pareto_front_keeps_only_undominated_models():
    from edgefleet.models.evaluate import Evaluation
    from edgefleet.models.plot import pareto_front

    def model(name, ms, agreement):
        return Evaluation(name, 1.0, agreement, 1.0, 1.0, 1, 10, ms, ms, ms, 1.0, 1, "n/a")

    fp32, int8, mixed, dynamic = model("fp32", 9.0, 1.0), model("int8", 4.0, 0.86), model("mixed", 5.0, 0.91), model("dyn", 80.0, 0.6)
    slow_and_worse = model("worse", 6.0, 0.85)
    assert [m.model for m in pareto_front([fp32, int8, mixed, dynamic, slow_and_worse])] == ["int8", "mixed", "fp32"]


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
    (row,) = json.loads(out["json"].read_text())
    assert row["top1_agreement"] == 1.0 and row["samples"] == 28 and row["p99_ms"] >= row["p50_ms"]
    assert row["labelled_samples"] == 4 and 0.0 <= row["accuracy"] <= 1.0
    assert out["md"].read_text().startswith("| model |")
    assert out["png"].read_bytes().startswith(b"\x89PNG")
