"""Infer: an ONNX Runtime session on an ordered list of execution providers, and the truth about which
one is really active. ONNX Runtime drops a provider it cannot load with only a log line; we compare
what was asked for with what the session reports and make the difference loud."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.errors import ProviderRefused, UnknownProvider
from shared.logs import fields
from shared.manifest import ModelManifest
from shared.schemas import ProviderReport

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

# ONNX Runtime graph optimizers no model session runs. WeightBiasQuantization (ONNX Runtime >= 1.21) turns a
# float Conv fed by a DequantizeLinear into a quantized one, re-quantizing its weights per tensor: a layer
# a mixed-precision model kept in float is then quantized anyway, worse than the quantizer would have done
# it (measured on EfficientNet-Lite0, 1-8 float layers: 67-75 % top-1 agreement with FP32 with the pass,
# 87-90 % without). It costs nothing elsewhere: FP32 and all-layer INT8 get the same optimized graph either
# way (8.06 / 8.02 and 4.17 / 4.09 ms/img at batch 8, 1 thread). ONNX Runtime ignores an unknown name here
# silently; tests/unit/test_session_optimizers.py checks that this one still takes effect.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def plan_workers(providers: list[str], workers: int, intra_op_threads: int) -> tuple[int, int]:
    """How many model runs go in parallel, and with how many threads each.

    Args:
        providers: the execution providers in order of preference (short or full names).
        workers: parallel runs; 0: one per core when the first provider is the CPU, else one.
        intra_op_threads: ONNX Runtime threads per run; 0: 1 with several workers, else its default, or
            the cores this process may use where it may use fewer than the machine has.

    Returns:
        (parallel runs, threads per run), 0 threads meaning ONNX Runtime's default.

    Raises:
        UnknownProvider: the first provider is not one ONNX Runtime knows.
    """
    cores = len(os.sched_getaffinity(0))
    if workers == 0:
        on_cpu = provider_name(providers[0]) == "CPUExecutionProvider"
        workers = cores if on_cpu else 1
    if intra_op_threads == 0 and workers > 1:
        intra_op_threads = 1
    elif intra_op_threads == 0 and cores < (os.cpu_count() or cores):
        # ONNX Runtime's default is a thread per core of the machine, not per core this process may run
        # on: pinned to one core of two, its second thread spins against the first on that core (5 runs
        # at batch 8: 0.50 s against 0.28 s with one thread; the whole path 37 against 85 images/s).
        intra_op_threads = cores
    return workers, intra_op_threads


def provider_name(short_or_full: str) -> str:
    """ONNX Runtime's name for an execution provider given by its short name (cuda) or its full one.

    Raises:
        UnknownProvider: neither a short name of PROVIDER_NAMES nor one of its full names.
    """
    name = PROVIDER_NAMES.get(short_or_full.lower(), short_or_full)
    if name not in PROVIDER_NAMES.values():
        raise UnknownProvider(f"unknown execution provider {short_or_full!r}; known: {', '.join(PROVIDER_NAMES)}")
    return name


@dataclass
class ModelSession:
    manifest: ModelManifest
    provider: ProviderReport
    _session: ort.InferenceSession
    _input_name: str

    @classmethod
    def open(
        cls,
        manifest: ModelManifest,
        model_path: Path,
        providers: list[str],
        strict: bool,
        intra_op_threads: int = 0,
    ) -> ModelSession:
        """Opens an ONNX Runtime session on the first of `providers` this machine has, CPU last.

        Args:
            manifest: the model's verified manifest.
            model_path: its ONNX file.
            providers: execution providers in order of preference (short or full names).
            strict: refuse a session whose active provider is not the first requested one.
            intra_op_threads: ONNX Runtime threads per run; 0: its default.

        Returns:
            The session, with the report of what was requested, available and active.

        Raises:
            UnknownProvider: a provider name ONNX Runtime does not know.
            ProviderRefused: `strict` and the first requested provider is not the active one.
        """
        requested = [provider_name(p) for p in providers]
        available = ort.get_available_providers()
        # CPU always stays last in the list: a missing accelerator degrades to a slower answer, and
        # whether that is acceptable is the policy's call below, not a crash inside ONNX Runtime.
        chosen = [p for p in requested if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's default spinning is kept: without it, waking the pool for each of the
        # model's ~60 parallel sections cost more than the second thread gained on a 2-core VM
        # (batch-1 latency 9.5 ms against 5.2 ms, measured).
        session = ort.InferenceSession(str(model_path), options, providers=chosen,
                                       disabled_optimizers=DISABLED_OPTIMIZERS)
        active = session.get_providers()[0]
        report = ProviderReport(
            requested=requested, available=available, active=active, fallback=active != requested[0]
        )
        if report.fallback:
            message = (
                f"execution provider {requested[0]} is not active: running on {active} "
                f"(available here: {', '.join(available)})"
            )
            if strict:
                raise ProviderRefused(message + "; provider_policy=strict refuses to serve on a fallback")
            log.warning(message, extra=fields(requested=requested, active=active))
        return cls(manifest, report, session, session.get_inputs()[0].name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output (logits, one row per frame) for an NCHW float32 batch.

        Safe to call from several threads at once: ONNX Runtime sessions are. Raises whatever ONNX
        Runtime raises when a run fails (an execution provider failing, a batch of the wrong shape).
        """
        logits: np.ndarray = self._session.run(None, {self._input_name: batch})[0]
        return logits
