"""The predictions a simulated device's inference would make, recorded once from the real model.

`edgefleet simulate record` runs the real model (var/models/efficientnet-lite0) on the bundled test
photos, as the camera sends them, and writes what each photo got (top-1 label, its confidence) and the
latency of each of a batch of runs. A simulated device skips inference: when its canary asks for a
model's prediction window, the window is drawn from this recording, cycling through the photos in the
order a camera sends them, for as many predictions as the time the model has been serving allows.
Nothing is computed per prediction while nobody asks.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pydantic import BaseModel, Field

from services.sync import canary

DEFAULT_PATH = Path("var/simulate/predictions.json")
RUNS_PER_PHOTO = 10
# Untimed runs per photo before its timed ones: a session's first runs (allocations, caches) are slower
# than it ever is again, and a canary's p95 drawn with one of them would judge the recording, not a switch.
WARMUP_RUNS_PER_PHOTO = 2
# Each recorded latency is the median of this many back-to-back runs: a scheduler hiccup of the machine
# that recorded is not the model's latency, and with a small model (tens of µs) one such outlier in a
# window's p95 would fail a canary that compares the recording against itself.
TIMINGS_PER_RUN = 3


class PhotoPrediction(BaseModel):
    photo: str
    label: str
    confidence: float = Field(ge=0, le=1)
    latencies_ms: list[float] = Field(min_length=1)  # one per run


class Recording(BaseModel):
    """What `edgefleet simulate record` wrote: the model it ran and each photo's outcome."""

    model: str
    version: int
    sha256: str
    predictions: list[PhotoPrediction] = Field(min_length=1)


def record(model_dir: Path, out: Path, runs: int = RUNS_PER_PHOTO) -> Recording:
    """Runs the real model once over the bundled photos and writes the recording to `out` (atomically).

    :param Path model_dir: a verified model folder (model.onnx, manifest.json).
    :param Path out: where the JSON goes (its folder is created).
    :param int runs: latencies per photo, each the median of TIMINGS_PER_RUN runs (after
        WARMUP_RUNS_PER_PHOTO untimed ones).
    :returns: the recording.
    :raises ModelError: the model folder does not verify.
    """
    import numpy as np
    import onnxruntime as ort

    from edgefleet.photos import BUNDLED, jpeg
    from services.inference.decode import decode_bgr
    from services.inference.postprocess import top_k
    from services.inference.preprocess import Preprocessor
    from shared.atomic import write_atomic
    from shared.manifest import load_verified

    manifest, path = load_verified(model_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preprocess = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    rows = []
    for name in BUNDLED:
        tensor = np.empty((1, 3, crop, crop), np.float32)
        preprocess(decode_bgr(jpeg(name)), tensor[0])
        latencies = []
        for _ in range(WARMUP_RUNS_PER_PHOTO):
            session.run(None, {manifest.input.name: tensor})
        for _ in range(runs):
            timings = []
            for _ in range(TIMINGS_PER_RUN):
                started = time.perf_counter()
                logits = session.run(None, {manifest.input.name: tensor})[0]
                timings.append(time.perf_counter() - started)
            latencies.append(round(statistics.median(timings) * 1000, 3))
        index, probability = top_k(logits, 1)
        rows.append(PhotoPrediction(photo=name, label=manifest.labels[int(index[0, 0])],
                                    confidence=round(float(probability[0, 0]), 5), latencies_ms=latencies))
    recording = Recording(model=manifest.name, version=manifest.version, sha256=manifest.sha256, predictions=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, recording.model_dump_json(indent=1).encode())
    return recording


def load(path: Path, model_dir: Path | None = None) -> Recording:
    """The recording at `path`; recorded first from `model_dir` if the file is missing.

    :raises FileNotFoundError: no file and no model folder to record from.
    :raises pydantic.ValidationError: the file is not a recording.
    """
    if not path.exists():
        if model_dir is None:
            raise FileNotFoundError(f"{path}: no recorded predictions (run `edgefleet simulate record`)")
        return record(model_dir, path)
    return Recording.model_validate_json(path.read_bytes())


class Draw:
    """Predictions of the model a simulated inference serves, counted from when it started serving.

    :param Recording recording: the distribution drawn from (shared by every device of a process).
    :param float per_s: predictions a second (--predictions-per-s).
    :param int warmup: the first predictions of a model the canary does not count (CanarySettings.warmup).
    :param int offset: where in the photo cycle this device starts (devices do not all see the same photo).
    """

    __slots__ = ("_recording", "_per_s", "_warmup", "_offset")

    def __init__(self, recording: Recording, per_s: float, warmup: int, offset: int) -> None:
        self._recording, self._per_s, self._warmup, self._offset = recording, per_s, warmup, offset

    def count(self, serving_s: float) -> int:
        """Predictions the canary counts after a model served `serving_s` seconds (its warmup left out)."""
        return max(0, int(serving_s * self._per_s) - self._warmup)

    def seconds_for(self, count: int) -> float:
        """How long a model must serve before the canary counts `count` of its predictions."""
        return (count + self._warmup) / self._per_s if self._per_s > 0 else float("inf")

    def window(self, size: int, serving_s: float) -> canary.Window:
        """The canary's window for a model that served `serving_s` seconds: its last `size` counted
        predictions, drawn in camera order from the recording."""
        window = canary.Window(size)
        made = int(serving_s * self._per_s)
        rows = self._recording.predictions
        for i in range(max(self._warmup, made - size), made):
            row = rows[(self._offset + i) % len(rows)]
            window.labels.append(row.label)
            window.confidences.append(row.confidence)
            window.latencies.append(row.latencies_ms[(i // len(rows)) % len(row.latencies_ms)])
            window.outcomes.append(True)
        return window

