"""The graph optimizers model sessions leave out really are left out: a Conv kept in float behind a
DequantizeLinear (what a mixed-precision model has) computes with its float weights, where ONNX Runtime's
WeightBiasQuantization would have quantized them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgefleet.models.outputs import session
from services.inference.session import DISABLED_OPTIMIZERS


def _float_conv_after_dequantize(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.05, (8, 4, 3, 3)).astype(np.float32)
    weights[0, 0, 0, 0] = 4.0  # one outlier: a per-tensor INT8 scale then rounds the small weights coarsely
    initializers = [
        numpy_helper.from_array(np.float32(1 / 64), "scale"), numpy_helper.from_array(np.uint8(128), "zero"),
        numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("Conv", ["xd", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        # The next layer's quantized input, as in a QDQ model: the pass looks for a Conv between the two.
        helper.make_node("QuantizeLinear", ["c", "scale", "zero"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "scale", "zero"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "float_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _run(runner: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = runner.run(None, {"x": x})[0]
    return out


def test_a_float_conv_behind_dequantize_keeps_its_float_weights(tmp_path):
    path = tmp_path / "model.onnx"
    _float_conv_after_dequantize(path)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 8, 8)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = _run(ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]), x)
    optimized = _run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), x)
    served = _run(session(path, threads=1), x)
    # With every optimizer on, the float weights are quantized (so the name in DISABLED_OPTIMIZERS still
    # names a pass that runs); with the service's list off, the float arithmetic stays.
    assert DISABLED_OPTIMIZERS == ["WeightBiasQuantization"]
    assert np.abs(optimized - reference).max() > 1e-3
    np.testing.assert_allclose(served, reference, atol=1e-5)
