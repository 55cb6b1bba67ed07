"""A model's outputs on many inputs: batched runs and probabilities, shared by quantize and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.session import DISABLED_OPTIMIZERS


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on `path` with the graph optimizers the service runs (so what is measured here is what
    is served)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def logits(model: Path | ort.InferenceSession, input_name: str, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    runner = session(model) if isinstance(model, Path) else model
    return np.concatenate([runner.run(None, {input_name: inputs[i : i + batch]})[0]
                           for i in range(0, len(inputs), batch)])


def softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
