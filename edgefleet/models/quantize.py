"""`edgefleet model quantize`: INT8 with onnxruntime.quantization.

- dynamic: weights in INT8 (QUInt8 or QInt8), activations quantized at run time;
- static: QDQ with per-channel weights, activations calibrated (MinMax, Entropy or Percentile) on real
  frames through the inference service's own decode and preprocessing; the model's outputs (the logits)
  stay float, computed from INT8 weights and inputs (`_outputs_in_float`).

Mixed precision by measurement (static), chosen by its effect on the held-out gate, honestly. The
held-out set is split in two, every other image: the *selection half* ranks the layers and decides how
many stay in float; the *gate half* alone measures the quality gate written to the manifest. The
calibration frames fit the activation ranges, all of them. The search: calibrate once, quantize one
layer at a time and measure how far the output moves on the selection half (KL divergence from the
float model), then keep the worst layers in float, one by one, until the top-1 agreement on the
selection half reaches the gate plus one standard error of the gate half's own estimate (`gate_target`),
or the budget of float layers is spent. Why not choose on calibration frames, as this once did:
agreement on them (even on frames the ranges were not fitted to) ran well above agreement on held-out
images, so the search stopped early and the held-out gate failed (84.7 % at a 0.9 gate on the full
data set). Why not keep adding layers while the held-out gate fails: the gate
would then be the stopping rule's own data and pass by construction. With the split, the gate half has
no part in any choice, and a gate that still fails says so (`Report.warning`); the model is written,
marked failed, and `model publish` refuses it. Without a search (`max_float_layers` 0, or dynamic
mode) nothing is chosen on held-out images and the whole set measures the gate.

A layer is a Conv or Gemm with the activation that follows it: leaving the activation quantized over
the float layer's raw range would cost more than it saves.

A float layer is not float as ONNX Runtime (1.32) serves it: its WeightBiasQuantization pass quantizes
the float weights of any Conv or Gemm whose input comes from a DequantizeLinear, per-tensor, at session
load. Measured on 300 held-out images (layers ranked on the calibration frames): 1-8 layers "in float"
gave 67-75 % top-1 agreement against 85.7 % with none, 87-90 % with that pass disabled. The search
measures the model as served, so it sees the loss and a failed gate says so.

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

from edgefleet.models.biascorrect import FRAMES as BIAS_FRAMES
from edgefleet.models.biascorrect import correct_biases
from edgefleet.models.derive import gate_target, install_derived, measure_quality, top1_agreement
from edgefleet.models.frames import load_inputs
from edgefleet.models.outputs import logits, softmax
from edgefleet.progress import QUIET, Reporter
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
    # and the selection half's agreement once it is in float.
    float_layers: list[tuple[str, float, float]] = field(default_factory=list)
    # The search's budget, the agreement it aims for on the selection half, and the selection half's
    # agreement at its end (no search: budget 0, 0 images).
    budget: int = 0
    target: float = 0.0
    selection_agreement: float = 0.0
    selection_samples: int = 0
    gate: float = 0.0
    agreement: float = 0.0  # on the gate half (the whole held-out set without a search)
    samples: int = 0
    seconds: float = 0.0

    def warning(self) -> str | None:
        """Why the model failed its quality gate and what would change it, in words; None if it passed."""
        if self.agreement >= self.gate:
            return None
        failed = (f"{self.agreement:.1%} top-1 agreement on {self.samples} held-out images is below the gate "
                  f"{self.gate:.0%}: the model is marked failed and `edgefleet model publish` will refuse it")
        if self.mode != Mode.STATIC.value:
            return f"{failed}."
        if not self.budget:
            return f"{failed}; no layers were kept in float (--max-float-layers 0)."
        if self.selection_agreement < self.target:
            return (f"{failed}; the float-layer budget ran out ({len(self.float_layers)} of {self.budget} layers "
                    f"kept in float) with the selection half at {self.selection_agreement:.1%} (aiming for "
                    f"{self.target:.1%}): raise --max-float-layers or lower --gate.")
        return (f"{failed}; the selection half reached {self.selection_agreement:.1%} (aiming for "
                f"{self.target:.1%}) with {len(self.float_layers)} layers in float, the gate half did not: the two "
                "halves disagree (more held-out images would narrow the gap).")

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
    bias_correction: bool = False,
    *,
    progress: Reporter = QUIET,
) -> tuple[ModelManifest, Report]:
    """Quantizes the parent's model to INT8 and installs it with its recipe and quality gate (module docstring).

    Args:
        progress: shown each step: images read, the calibrate-and-quantize call, layers probed.

    Returns:
        The installed manifest and what the run measured and chose.

    Raises:
        ModelError: the parent does not verify or is not valid ONNX.
        FileNotFoundError: no images in a folder.
        ValueError: static mode without a calibration folder.
    """
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
        with progress.task("preparing the graph (shape inference, clean-up)"):
            quant_pre_process(str(parent_path), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "model.onnx"
        held_out = load_inputs(eval_dir, parent, eval_limit, progress=progress)
        gate_set = held_out
        if mode is Mode.DYNAMIC:
            with progress.task("quantizing (dynamic INT8)"):
                quantize_dynamic(str(prepared), str(staged), weight_type=weight_type.ort, nodes_to_exclude=excluded)
            recipe = {"weight_type": weight_type.value}
        else:
            if calibration_dir is None:
                raise ValueError("static quantization needs a calibration folder of real frames")
            calibration = load_inputs(calibration_dir, parent, calibration_limit, progress=progress)
            select, gate_set = _split(held_out) if max_float_layers > 0 else (held_out[:0], held_out)
            static = _StaticQuantizer(prepared, parent.input.name, calibration, select, method, weight_type,
                                      Path(tmp), progress)
            with progress.task(f"calibrating on {len(calibration)} images and quantizing (static INT8)"):
                static.quantize(staged, excluded)
            report.budget, report.selection_samples = max_float_layers, len(select)
            if len(select):
                report.selection_agreement = top1_agreement(static.reference,
                                                            logits(staged, parent.input.name, select))
            report.target = gate_target(gate, len(gate_set))
            if len(select) and report.selection_agreement < report.target:
                report.float_layers = static.mixed_precision(staged, excluded, report.target, max_float_layers)
                if report.float_layers:
                    report.selection_agreement = report.float_layers[-1][2]
            # After the search, on the model it chose: the probes stay cheap, and the gate below measures
            # the corrected model. Calibration frames only: the held-out ones judge it.
            corrected = 0
            if bias_correction:
                with progress.task("correcting biases"):
                    corrected = correct_biases(staged, prepared, parent.input.name, calibration)
            recipe = {
                "weight_type": weight_type.value, "activation_type": "quint8", "format": "qdq", "per_channel": "true",
                "outputs": "float" if _outputs_are_float(staged) else "quantized",
                "calibration_method": method.value,
                "calibration_set": f"{calibration_dir} ({len(calibration)} images fit the ranges)",
                "float_layer_selection": (
                    f"{eval_dir}: {len(select)} held-out images (every other one) ranked the layers and chose how "
                    f"many stay in float (agreement {report.selection_agreement:.4f}, aiming for "
                    f"{report.target:.4f}, budget {max_float_layers}); "
                    f"the other {len(gate_set)} alone measure the quality gate") if len(select) else "none",
                "float_layers": ",".join(name for name, _, _ in report.float_layers) or "none",
                "bias_correction": (f"{corrected} convolutions, channel means on the first "
                                    f"{min(BIAS_FRAMES, len(calibration))} calibration images"
                                    if corrected else "none"),
            }
        with progress.task(f"measuring agreement with the parent on {len(gate_set)} held-out images"):
            quality = measure_quality(parent_path, staged, parent.input.name, gate_set, eval_dir, gate)
        if len(gate_set) < len(held_out):
            quality = quality.model_copy(update={"measured_on": f"{eval_dir} (gate half: every other image from "
                                                                "the second; the rest chose the float layers)"})
        report.agreement, report.samples, report.gate = quality.value, quality.samples, gate
        recipe = {"quantizer": f"onnxruntime.quantization {ort.__version__}", "mode": mode.value, **recipe,
                  "left_in_float": report.left_in_float()}
        installed = install_derived(parent, derived_name(parent.name, mode, method), staged, recipe, quality, out_dir)
    report.seconds = time.monotonic() - started
    return installed, report


class _StaticQuantizer:
    """Static QDQ quantization of one prepared model, calibrated once and re-quantized cheaply with
    different layers kept in float."""

    def __init__(self, prepared: Path, input_name: str, calibration: np.ndarray, selection: np.ndarray,
                 method: Method, weight_type: WeightType, workdir: Path, progress: Reporter = QUIET) -> None:
        self.prepared, self.input_name = prepared, input_name
        self.calibration, self.selection = calibration, selection
        self.method, self.weight_type, self.workdir = method, weight_type, workdir
        self.progress = progress
        self.cache = workdir / "calibration.cache"
        # Without a selection half (no search) there is nothing to compare against.
        self.reference = logits(prepared, input_name, selection) if len(selection) else selection

    def quantize(self, out: Path, exclude: list[str]) -> None:
        quantize_static(
            str(self.prepared), str(out), _Inputs(self.input_name, self.calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=self.weight_type.ort,
            calibrate_method=self.method.ort, nodes_to_exclude=exclude,
            calibration_cache_path=str(self.cache),  # the first call calibrates; the rest reuse it
        )
        _outputs_in_float(out)

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
        """Ranks layers by the output shift each causes alone on the selection frames, then keeps the worst
        in float until the selection frames' agreement reaches the gate; leaves the best model found at `out`."""
        layers = self.layers()
        everything = [name for layer in layers for name in layer]
        probe = self.workdir / "probe.onnx"
        sensitivity = []
        with self.progress.task(f"ranking {len(layers)} layers by sensitivity", len(layers)) as ranking:
            for layer in layers:
                self.quantize(probe, excluded + [n for n in everything if n not in layer])
                sensitivity.append((_kl(self.reference, logits(probe, self.input_name, self.selection)), layer))
                ranking.advance()
        sensitivity.sort(key=lambda s: s[0], reverse=True)
        kept: list[tuple[str, float, float]] = []
        in_float = list(excluded)
        candidates = sensitivity[:budget]
        with self.progress.task(f"keeping layers in float until {gate:.1%} (at most {len(candidates)})",
                                len(candidates)) as keeping:
            for shift, layer in candidates:
                in_float += layer
                self.quantize(probe, in_float)
                agreement = top1_agreement(self.reference, logits(probe, self.input_name, self.selection))
                kept.append((layer[0], round(shift, 5), round(agreement, 4)))
                probe.replace(out)
                keeping.advance()
                if agreement >= gate:
                    break
        return kept


def _outputs_in_float(path: Path) -> int:
    """Takes out the QuantizeLinear -> DequantizeLinear pair between a Gemm or MatMul and a graph output that
    nothing else reads, so that layer (the classifier) computes the output in float from its INT8 weights and
    inputs (ONNX Runtime fuses it into QGemm with a float output). Any other shape is left as quantized.
    Returns how many outputs it freed.

    Why: quantized to 8 bits, the logits of EfficientNet-Lite0 took 228 distinct values over 96 frames x 1000
    classes and tied top-1 with top-2 exactly on 3 of the 96, so the scores users read tie and a cascade's
    margin cannot rank the unsure frames. Measured (300 held-out images, 400 random half splits): at the
    same cross-checked agreement a cascade escalated 10.5 % of frames, not 13.2 % (98.8 %), or 13.9 %, not
    17.3 % (99.5 %). The weights stay INT8: the file is the same size (5.18 MB), the time the same.
    """
    model = onnx.load(str(path))
    graph = model.graph
    freed = 0
    for output in graph.output:
        producers = {out: node for node in graph.node for out in node.output}
        readers = collections.Counter(name for node in graph.node for name in node.input)
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        source = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if (source is None or source.op_type not in ("Gemm", "MatMul") or readers[output.name]
                or readers[q.output[0]] != 1 or readers[q.input[0]] != 1):
            continue  # read inside the graph too, or not a classifier's output: its readers need the pair
        source.output[list(source.output).index(q.input[0])] = output.name
        for node in (q, dq):
            graph.node.remove(node)
        _drop_unread(graph, [*q.input[1:], *dq.input[1:]])
        for stale in [v for v in graph.value_info if v.name in (q.input[0], q.output[0])]:
            graph.value_info.remove(stale)
        freed += 1
    if freed:
        onnx.save(model, str(path))
    return freed


def _outputs_are_float(path: Path) -> bool:
    """Whether no graph output of the model at `path` comes out of a DequantizeLinear (what the recipe says,
    and what `bench cascade` and `bench pipeline` check before they reuse a model)."""
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return all(producers.get(output.name) != "DequantizeLinear" for output in graph.output)


def _drop_unread(graph: onnx.GraphProto, names: list[str]) -> None:
    """Removes the initializers among `names` that no node reads any more (ONNX Runtime warns at every
    session open about an unused initializer)."""
    read = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name in names and i.name not in read]:
        graph.initializer.remove(initializer)


def _split(held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(selection half, gate half) of the held-out frames, every other one: the data set cycles through
    its photos, so each half sees every photo. A single frame goes to the gate (nothing is selected)."""
    if len(held_out) < 2:
        return held_out[:0], held_out
    return held_out[0::2], held_out[1::2]


def _kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    p, q = softmax(reference), softmax(candidate)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))

