"""The compression tools' logic, in this process: the evaluation/calibration dataset made from real
photos, the quantizer on tiny synthetic models (an op it has no rule for, a bad input, an artificially
sensitive layer), and the Pareto front. The real model, served and published, is in
tests/test_compression.py."""

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
from edgefleet.models.install import install
from edgefleet.models.quantize import Mode, Report, quantize
from shared.manifest import ModelError, ModelManifest, Preprocessing, TensorSpec


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
    manifest, report = quantize(tmp_path / "tiny" / "model", tmp_path / "int8", Mode.STATIC, data / "eval",
                                data / "calibration", gate=0.0)
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
    # Every other held-out image chose the layers; the other 12 alone measured the gate (all 24 without a search).
    assert report.selection_samples == 12 and mixed.quality.samples == 12 and plain.quality.samples == 24
    assert report.selection_agreement >= 0.9 and "gate half" in mixed.quality.measured_on
    # It aims above the gate by one standard error of the 12 gate images' share (0.9 ± 0.087).
    assert report.target == pytest.approx(0.9 + (0.9 * 0.1 / 12) ** 0.5)


@pytest.mark.parametrize(("report", "says"), [
    (Report("static", budget=3, float_layers=[("a", 1.0, 0.8)] * 3, selection_agreement=0.8, gate=0.9,
            target=0.9245, agreement=0.78, samples=150),
     "the float-layer budget ran out (3 of 3 layers kept in float) with the selection half at 80.0% (aiming for "
     "92.5%): raise --max-float-layers or lower --gate"),
    (Report("static", budget=24, float_layers=[("a", 1.0, 0.93)], selection_agreement=0.93, gate=0.9,
            target=0.9245, agreement=0.86, samples=150),
     "the selection half reached 93.0% (aiming for 92.5%) with 1 layers in float, the gate half did not"),
    (Report("static", gate=0.97, agreement=0.85, samples=300), "no layers were kept in float (--max-float-layers 0)"),
    (Report("dynamic", gate=0.97, agreement=0.5, samples=300), "`edgefleet model publish` will refuse it."),
])
def test_a_failed_gate_is_explained_in_plain_words(report, says):
    warning = report.warning()
    assert f"{report.agreement:.1%} top-1 agreement on {report.samples} held-out images is below the gate" in warning
    assert says in warning
    assert Report("static", gate=0.9, agreement=0.9, samples=150).warning() is None


def test_pareto_front_keeps_only_undominated_models():
    from edgefleet.models.evaluate import Evaluation
    from edgefleet.models.plot import pareto_front

    def model(name, ms, agreement):
        return Evaluation(name, 1.0, agreement, 1.0, 1.0, 1, 10, ms, ms, ms, 1.0, 1, "n/a")

    fp32, int8, mixed = model("fp32", 9.0, 1.0), model("int8", 4.0, 0.86), model("mixed", 5.0, 0.91)
    dynamic = model("dyn", 80.0, 0.6)
    slow_and_worse = model("worse", 6.0, 0.85)
    assert [m.model for m in pareto_front([fp32, int8, mixed, dynamic, slow_and_worse])] == ["int8", "mixed", "fp32"]


def _qdq_tail(source_op: str, read_inside: bool, path):
    """x -> source (Gemm or a 1x1 Conv) -> QuantizeLinear -> DequantizeLinear -> "logits", the tail a QDQ
    quantizer leaves; with `read_inside`, the logits also feed a Relu whose result is a second output."""
    rng = np.random.default_rng(1)
    if source_op == "Gemm":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        weight = numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "w")
        source = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        shape = [1, 3]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])
        weight = numpy_helper.from_array(rng.normal(size=(3, 4, 1, 1)).astype(np.float32), "w")
        source = helper.make_node("Conv", ["x", "w"], ["y"])
        shape = [1, 3, 1, 1]
    scale = numpy_helper.from_array(np.array(0.05, dtype=np.float32), "y_scale")
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "y_zero")
    nodes = [source, helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)]
    if read_inside:
        nodes.append(helper.make_node("Relu", ["logits"], ["relu"]))
        outputs.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, shape))
    model = helper.make_model(helper.make_graph(nodes, "tail", [x], outputs, [weight, scale, zero]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_a_classifier_output_is_computed_in_float_and_its_pair_and_constants_go(tmp_path):
    from edgefleet.models.quantize import _outputs_in_float

    path = _qdq_tail("Gemm", False, tmp_path / "gemm.onnx")
    assert _outputs_in_float(path) == 1
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Gemm"] and model.graph.node[0].output[0] == "logits"
    assert [i.name for i in model.graph.initializer] == ["w"]  # no unread scale or zero point left to warn about
    x = np.ones((1, 4), np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-6)  # exact float sums, not a 0.05 grid


@pytest.mark.parametrize("source_op, read_inside", [("Gemm", True), ("Conv", False)])
def test_an_output_read_inside_the_graph_or_made_by_another_op_stays_quantized(tmp_path, source_op, read_inside):
    from edgefleet.models.quantize import _outputs_in_float

    path = _qdq_tail(source_op, read_inside, tmp_path / "tail.onnx")
    before = path.read_bytes()
    assert _outputs_in_float(path) == 0
    assert path.read_bytes() == before
