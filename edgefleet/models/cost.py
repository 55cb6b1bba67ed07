"""What a model costs, read off its ONNX graph: parameters and multiply-accumulates per image.

Counted on the exported artifact rather than the torch network, so the figures describe exactly what
the device runs. Only Conv, Gemm and MatMul are counted: everything else is a rounding error beside them
in a CNN. (torch-pruning's own counter misses this network's padded convolutions.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference


@dataclass(frozen=True)
class Cost:
    parameters: int
    macs: int
    # Weights that are exactly zero: unstructured pruning makes many, and dense kernels still multiply them.
    zero_parameters: int


def cost(path: Path) -> Cost:
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    float_weights = [w for w in weights.values() if w.dtype.kind == "f"]
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)
    }
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights and node.output[0] in shapes:
            out_channels, in_per_group, *kernel = weights[node.input[1]].shape
            macs += int(np.prod(shapes[node.output[0]][2:])) * out_channels * in_per_group * int(np.prod(kernel))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights:
            macs += int(np.prod(weights[node.input[1]].shape))
    return Cost(
        parameters=int(sum(w.size for w in float_weights)),
        macs=macs,
        zero_parameters=int(sum((w == 0).sum() for w in float_weights)),
    )
