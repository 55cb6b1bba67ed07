"""The model-aware canary: after a switch, the new model is judged against the one before it on the
same device, from what each predicted over its own window: error rate, p95 inference latency, the
predicted-class distribution (PSI) and mean top-1 confidence. Predictions name the model that made
them, so the windows never mix."""

from __future__ import annotations

import threading
from collections import deque

from shared.config import CanarySettings
from shared.schemas import CanaryVerdict, Prediction
from shared.stats import mean, p95, psi


class Window:
    """The last `size` outcomes of one model: predictions and inference failures."""

    def __init__(self, size: int) -> None:
        self.labels: deque[str] = deque(maxlen=size)
        self.confidences: deque[float] = deque(maxlen=size)
        self.latencies: deque[float] = deque(maxlen=size)
        self.outcomes: deque[bool] = deque(maxlen=size)  # True: answered, False: failed

    def add_prediction(self, prediction: Prediction) -> None:
        self.labels.append(prediction.top[0].label if prediction.top else "")
        self.confidences.append(prediction.top[0].score if prediction.top else 0.0)
        self.latencies.append(prediction.timings.inference_ms)
        self.outcomes.append(True)

    def add_failure(self) -> None:
        self.outcomes.append(False)

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def error_rate(self) -> float:
        return self.outcomes.count(False) / len(self.outcomes) if self.outcomes else 0.0


class Watch:
    """Windows per model SHA-256, fed from the MQTT thread and read by the sync worker."""

    def __init__(self, canary: CanarySettings) -> None:
        self.size, self.warmup = canary.window, canary.warmup
        self._windows: dict[str, Window] = {}
        # A model's first runs after a switch are slower while ONNX Runtime sizes its buffers for real
        # batches; judged on them, a sound model was rolled back for its latency (36.9 against 21.9 ms).
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.serving: str | None = None  # failures are charged to the model serving when they happen

    def on_prediction(self, prediction: Prediction) -> None:
        if prediction.cached:
            # Not evidence about the model on a new frame: a copy of an answer already counted, with 0 ms of
            # model time. A static camera's canary waits for real runs (the cache's max age bounds the wait).
            return
        sha256 = prediction.model.sha256
        with self._lock:
            self._seen[sha256] = self._seen.get(sha256, 0) + 1
            if self._seen[sha256] > self.warmup:
                self._window(sha256).add_prediction(prediction)

    def on_failure(self) -> None:
        with self._lock:
            if self.serving:
                self._window(self.serving).add_failure()

    def snapshot(self, sha256: str) -> Window:
        with self._lock:
            window = self._windows.get(sha256) or Window(self.size)
            copy = Window(self.size)
            for name in ("labels", "confidences", "latencies", "outcomes"):
                getattr(copy, name).extend(getattr(window, name))
            return copy

    def _window(self, sha256: str) -> Window:
        if sha256 not in self._windows:
            self._windows[sha256] = Window(self.size)
        return self._windows[sha256]


def judge(before: Window, after: Window, limits: CanarySettings) -> CanaryVerdict:
    """The new model (after) against the old (before). Too few samples on either side is no verdict:
    inconclusive, never passed (an empty window has no errors and no drift, which is not evidence)."""
    reasons = []
    conclusive = len(before) >= limits.min_samples and len(after) >= limits.min_samples
    if not conclusive:
        reasons.append(f"inconclusive: {len(before)} samples before, {len(after)} after, minimum {limits.min_samples}")
    drift = psi(before.labels, after.labels) if before.labels and after.labels else None
    if drift is not None and drift > limits.max_psi:
        reasons.append(f"predicted classes shifted: PSI {drift:.2f} > {limits.max_psi}")
    if after.error_rate - before.error_rate > limits.max_error_rate:
        reasons.append(f"error rate {after.error_rate:.1%} against {before.error_rate:.1%} before")
    p95_before, p95_after = p95(before.latencies), p95(after.latencies)
    if p95_before and p95_after and p95_after > limits.max_latency_ratio * p95_before:
        reasons.append(f"p95 inference latency {p95_after:.1f} ms against {p95_before:.1f} ms before")
    conf_before, conf_after = mean(before.confidences), mean(after.confidences)
    if conf_before is not None and conf_after is not None and conf_before - conf_after > limits.max_confidence_drop:
        reasons.append(f"mean top-1 confidence {conf_after:.2f} against {conf_before:.2f} before")
    return CanaryVerdict(
        samples_before=len(before), samples_after=len(after),
        error_rate_before=round(before.error_rate, 4), error_rate_after=round(after.error_rate, 4),
        latency_p95_before_ms=_round(p95_before), latency_p95_after_ms=_round(p95_after),
        mean_confidence_before=_round(conf_before), mean_confidence_after=_round(conf_after),
        prediction_psi=_round(drift), passed=not reasons, reasons=reasons, conclusive=conclusive,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
