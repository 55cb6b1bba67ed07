"""`edgefleet model quantize`: INT8 with onnxruntime.quantization.

- dynamic: weights in INT8 (QUInt8 or QInt8), activations quantized at run time;
- static: QDQ with per-channel weights, activations calibrated (MinMax, Entropy or Percentile) on real
  frames through the inference service's own decode and preprocessing.

Mixed precision by measurement (static): calibrate once, quantize one layer at a time and measure how
far the output moves (KL divergence from the float model on the calibration frames), then keep the
worst layers in float, one by one, until agreement reaches the gate or the budget of float layers is
spent. Ranges are fitted on one half of the calibration frames and layers chosen on the other: measured
on the frames the ranges were fitted to, agreement looks better than it is. A layer is a Conv or Gemm
with the activation that follows it: leaving the activation quantized over the float layer's raw range
would cost more than it saves.

A node whose op the quantizer has no rule for is excluded, stays in float and is reported, never a
crash. The result's agreement with its parent on held-out images is written to its manifest as the
quality gate; a failed gate marks the model unpublishable.
"""

from __future__ import annotations

import collections
import tempfile
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

from edgefleet.models.derive import install_derived, measure_quality, top1_agreement
from edgefleet.models.frames import load_inputs
from edgefleet.models.outputs import logits, softmax
from shared.manifest import ModelError, ModelManifest, load_verified

# Plumbing ops move or reshape tensors without arithmetic of their own: nothing to quantize, nothing to report.
_NO_ARITHMETIC = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Shape", "Gather", "Concat",
                  "Slice"}


class Mode(StrEnum):
    DYNAMIC = "dynamic"
    STATIC = "static"


class Method(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"

    @property
    def ort(self) -> CalibrationMethod:
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[self.value]


class WeightType(StrEnum):
    QINT8 = "qint8"
    QUINT8 = "quint8"

    @property
    def ort(self) -> QuantType:
        return QuantType.QInt8 if self is WeightType.QINT8 else QuantType.QUInt8


@dataclass
class Report:
    mode: str
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (node, op type) left in float
    # Mixed precision: each layer kept in float, its own sensitivity (KL when it alone is quantized)
    # and the calibration agreement once it is in float.
    float_layers: list[tuple[str, float, float]] = field(default_factory=list)
    calibration_agreement: float = 0.0
    agreement: float = 0.0
    samples: int = 0
    seconds: float = 0.0

    def left_in_float(self) -> str:
        """'Add x9, ReduceMean x1': the ops this quantizer has no INT8 rule for, kept in float."""
        counts: dict[str, int] = {}
        for _, op in self.unsupported:
            counts[op] = counts.get(op, 0) + 1
        return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "none"


class _Inputs(CalibrationDataReader):
    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._feeds = iter([{input_name: inputs[i : i + 1]} for i in range(len(inputs))])

    def get_next(self):
        return next(self._feeds, None)


def derived_name(parent_name: str, mode: Mode, method: Method) -> str:
    """efficientnet-lite0-int8-static-minmax, efficientnet-lite0-int8-dynamic: the recipe at a glance."""
    return f"{parent_name}-int8-" + (mode.value if mode is Mode.DYNAMIC else f"static-{method.value}")


def unsupported_nodes(model: onnx.ModelProto, mode: Mode) -> list[tuple[str, str]]:
    """Nodes the quantizer has no rule for, by its own registry."""
    registry = QDQRegistry if mode is Mode.STATIC else IntegerOpsRegistry
    return [
        (node.name, node.op_type)
        for node in model.graph.node
        if node.op_type not in registry and node.op_type not in _NO_ARITHMETIC
    ]


def quantize(
    parent_dir: Path,
    out_dir: Path,
    mode: Mode,
    eval_dir: Path,
    calibration_dir: Path | None = None,
    method: Method = Method.MINMAX,
    weight_type: WeightType = WeightType.QINT8,
    gate: float = 0.97,
    max_float_layers: int = 0,
    calibration_limit: int | None = None,
    eval_limit: int | None = None,
) -> tuple[ModelManifest, Report]:
    started = time.monotonic()
    parent, parent_path = load_verified(parent_dir)
    try:
        model = onnx.load(str(parent_path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError and more for a bad file
        raise ModelError(f"{parent_path} is not a valid ONNX model: {exc}") from None
    report = Report(mode=mode.value, unsupported=unsupported_nodes(model, mode))
    excluded = [name for name, _ in report.unsupported]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up the quantizer expects (its documented first step).
        quant_pre_process(str(parent_path), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "model.onnx"
        if mode is Mode.DYNAMIC:
            quantize_dynamic(str(prepared), str(staged), weight_type=weight_type.ort, nodes_to_exclude=excluded)
            recipe = {"weight_type": weight_type.value}
        else:
            if calibration_dir is None:
                raise ValueError("static quantization needs a calibration folder of real frames")
            calibration = load_inputs(calibration_dir, parent, calibration_limit)
            fit, select = ((calibration[0::2], calibration[1::2]) if max_float_layers and len(calibration) > 1
                           else (calibration, calibration))
            static = _StaticQuantizer(prepared, parent.input.name, fit, select, method, weight_type, Path(tmp))
            static.quantize(staged, excluded)
            report.calibration_agreement = top1_agreement(static.reference, logits(staged, parent.input.name, select))
            if report.calibration_agreement < gate and max_float_layers > 0:
                report.float_layers = static.mixed_precision(staged, excluded, gate, max_float_layers)
                if report.float_layers:
                    report.calibration_agreement = report.float_layers[-1][2]
            recipe = {
                "weight_type": weight_type.value, "activation_type": "quint8", "format": "qdq", "per_channel": "true",
                "calibration_method": method.value,
                "calibration_set": f"{calibration_dir} ({len(fit)} images fit the ranges, "
                                   f"{len(select)} choose float layers)",
                "float_layers": ",".join(name for name, _, _ in report.float_layers) or "none",
            }
        held_out = load_inputs(eval_dir, parent, eval_limit)
        quality = measure_quality(parent_path, staged, parent.input.name, held_out, eval_dir, gate)
        report.agreement, report.samples = quality.value, quality.samples
        recipe = {"quantizer": f"onnxruntime.quantization {ort.__version__}", "mode": mode.value, **recipe,
                  "left_in_float": report.left_in_float()}
        installed = install_derived(parent, derived_name(parent.name, mode, method), staged, recipe, quality, out_dir)
    report.seconds = time.monotonic() - started
    return installed, report


class _StaticQuantizer:
    """Static QDQ quantization of one prepared model, calibrated once and re-quantized cheaply with
    different layers kept in float."""

    def __init__(self, prepared: Path, input_name: str, calibration: np.ndarray, selection: np.ndarray,
                 method: Method, weight_type: WeightType, workdir: Path) -> None:
        self.prepared, self.input_name = prepared, input_name
        self.calibration, self.selection = calibration, selection
        self.method, self.weight_type, self.workdir = method, weight_type, workdir
        self.cache = workdir / "calibration.cache"
        self.reference = logits(prepared, input_name, selection)

    def quantize(self, out: Path, exclude: list[str]) -> None:
        quantize_static(
            str(self.prepared), str(out), _Inputs(self.input_name, self.calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=self.weight_type.ort,
            calibrate_method=self.method.ort, nodes_to_exclude=exclude,
            calibration_cache_path=str(self.cache),  # the first call calibrates; the rest reuse it
        )

    def layers(self) -> list[list[str]]:
        model = onnx.load(str(self.prepared))
        consumers = collections.defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                consumers[name].append(node)
        return [
            [node.name] + [c.name for c in consumers[node.output[0]] if c.op_type in ("Clip", "Relu")]
            for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul")
        ]

    def mixed_precision(self, out: Path, excluded: list[str], gate: float,
                        budget: int) -> list[tuple[str, float, float]]:
        """Ranks layers by the output shift each causes alone, then keeps the worst in float until the
        calibration agreement reaches the gate; leaves the best model found at `out`."""
        layers = self.layers()
        everything = [name for layer in layers for name in layer]
        probe = self.workdir / "probe.onnx"
        sensitivity = []
        for layer in layers:
            self.quantize(probe, excluded + [n for n in everything if n not in layer])
            sensitivity.append((_kl(self.reference, logits(probe, self.input_name, self.selection)), layer))
        sensitivity.sort(key=lambda s: s[0], reverse=True)
        kept: list[tuple[str, float, float]] = []
        in_float = list(excluded)
        for shift, layer in sensitivity[:budget]:
            in_float += layer
            self.quantize(probe, in_float)
            agreement = top1_agreement(self.reference, logits(probe, self.input_name, self.selection))
            kept.append((layer[0], round(shift, 5), round(agreement, 4)))
            probe.replace(out)
            if agreement >= gate:
                break
        return kept


def _kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    p, q = softmax(reference), softmax(candidate)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))

