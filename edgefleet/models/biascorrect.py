"""Empirical bias correction of a static QDQ INT8 model (Nagel et al., "Data-Free Quantization", 2019, in
its empirical form): INT8 weights and activations shift each convolution's mean output away from the float
model's, and the shifts add up layer after layer. For every Conv, top to bottom, the per-channel mean of
its output over real frames is measured in the float model and in the INT8 model as corrected so far, and
the difference is taken out of the Conv's INT32 bias, in PASSES passes. Only bias values change: the
graph, its kernels and so its speed stay the same.

Why: on EfficientNet-Lite0, 300 held-out / 128 calibration images, static INT8 (MinMax, per-channel)
agreed with FP32 on 85.7 % of top-1 answers, 95.3 % after this correction on 64 calibration frames;
Percentile or Entropy calibration and layers kept in float did not pass 90 %. The layers are corrected one
by one: correcting all of them from one measurement counts every upstream shift again downstream and
diverged (50 % agreement, then 2 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

# Frames the means are measured on: 64 gave the same held-out agreement as 128 in half the time.
FRAMES = 64
# Top-to-bottom passes: correcting a layer moves the inputs of every layer below it, so a second pass takes
# out what the first left. Measured: 1 pass 94.7 % agreement, 2 passes 95.3 %.
PASSES = 2
_BATCH = 16


def correct_biases(qdq_path: Path, float_path: Path, input_name: str, frames: np.ndarray) -> int:
    """Rewrites the INT32 biases of `qdq_path`'s convolutions in place so that each one's per-channel mean
    output over `frames` matches the float model's.

    Args:
        qdq_path: a QDQ model made by onnxruntime.quantization from `float_path` (node names kept).
        float_path: the float model it was quantized from.
        input_name: the models' input.
        frames: preprocessed real frames, not the held-out ones (at most FRAMES are used).

    Returns:
        How many convolutions were corrected (a Conv without a quantized bias, or absent from the float
        model, is left as it is).
    """
    frames = frames[:FRAMES]
    model = onnx.load(str(qdq_path))
    float_model = onnx.load(str(float_path))
    float_outputs = {n.name: n.output[0] for n in float_model.graph.node if n.op_type == "Conv"}
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    convs = [(n, producers.get(n.input[2])) for n in model.graph.node  # graph order is topological
             if n.op_type == "Conv" and n.name in float_outputs and len(n.input) > 2]
    convs = [(n, dq) for n, dq in convs if dq is not None and dq.op_type == "DequantizeLinear"
             and dq.input[0] in initializers and dq.input[1] in initializers]
    targets = _channel_means(float_model, [float_outputs[n.name] for n, _ in convs], input_name, frames)
    for (conv, dq), target in [pair for _ in range(PASSES) for pair in zip(convs, targets, strict=True)]:
        # Measured after every layer above it was corrected, so this layer takes out only its own shift.
        (current,) = _channel_means(model, [conv.output[0]], input_name, frames)
        bias = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float64)
        corrected = np.clip(bias - np.round((current - target) / scale), -(2**31), 2**31 - 1).astype(np.int32)
        initializers[dq.input[0]].CopyFrom(numpy_helper.from_array(corrected, dq.input[0]))
    onnx.save(model, str(qdq_path))
    return len(convs)


def _channel_means(model: onnx.ModelProto, outputs: list[str], input_name: str,
                   frames: np.ndarray) -> list[np.ndarray]:
    """Per-channel means over frames and positions of the named (N, C, H, W) tensors. The QDQ model runs
    without graph optimizations, which would fuse the tensors away; its arithmetic is then the float
    reference of the INT8 kernels."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs if o not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runner = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums = [np.zeros(1)] * len(outputs)  # broadcasts to each tensor's channels on the first batch
    for start in range(0, len(frames), _BATCH):
        values = runner.run(outputs, {input_name: frames[start : start + _BATCH]})
        sums = [s + v.astype(np.float64).mean(axis=(2, 3)).sum(0) for s, v in zip(sums, values, strict=True)]
    return [s / len(frames) for s in sums]
