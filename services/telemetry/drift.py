"""Drift and health from the inference records: each model's first predictions after it starts
serving are its baseline; the most recent ones are compared with it.

- prediction drift: PSI of the predicted-class distribution (smoothed, so no division by zero);
- confidence drift: the fall of mean top-1 confidence;
- feature drift: the largest shift of an input statistic (Prediction.features), in baseline
  standard deviations;
- latency: p95 inference latency as a multiple of the baseline's.

No verdict on fewer than `min_samples` predictions. An alert is raised at one threshold and resolved
under a lower one (hysteresis), so a value hovering at the line makes one incident, not a storm; an
open alert is not raised again (one incident, one alert, one id), and its end is reported.

Besides the alerts, sample() gives the current scores as a DriftSample (queued every
sample_interval_s, charted by the fleet console) and the metrics read measure() at scrape time: the
detector is fed on paho's network thread and read from others, so one lock guards its state.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from shared.config import DriftSettings
from shared.schemas import Alert, AlertState, AlertType, DriftSample, ModelRef, Prediction, Severity
from shared.stats import mean, p95, psi


@dataclass(frozen=True)
class Rule:
    type: AlertType
    raise_at: float
    clear_at: float
    what: str


@dataclass
class Baseline:
    labels: list[str]
    confidence: float
    features: np.ndarray | None  # (features,) means
    feature_stds: np.ndarray | None
    latency_p95: float


class DriftDetector:
    def __init__(self, device: str, drift: DriftSettings, evaluate_every: int = 10) -> None:
        self.device, self.rules = device, {r.type: r for r in rules_from(drift)}
        self.baseline_size, self.min_samples, self.evaluate_every = drift.baseline, drift.min_samples, evaluate_every
        self.window: deque[Prediction] = deque(maxlen=drift.window)
        self._collecting: list[Prediction] = []
        self.baseline: Baseline | None = None
        self.model: ModelRef | None = None
        self.open: dict[AlertType, Alert] = {}
        self._since_evaluation = 0
        self._since_sample = 0  # predictions (cached ones too) since the last sample(): none, no new sample
        self._lock = threading.Lock()

    def observe(self, prediction: Prediction) -> list[Alert]:
        """Takes one record; returns the alerts raised or resolved by it."""
        with self._lock:
            self._since_sample += 1
            return self._observe(prediction)

    def measure(self) -> dict[AlertType, float]:
        """Each measure of the recent window against the baseline; none before there is a baseline or
        while the window holds fewer than min_samples (the rule alerts follow: no verdict on a few)."""
        with self._lock:
            return self._measure() if len(self.window) >= self.min_samples else {}

    def open_types(self) -> list[AlertType]:
        """The types of the alerts open now."""
        with self._lock:
            return list(self.open)

    def sample(self, now: float | None = None) -> DriftSample | None:
        """The scores now, the number of predictions in the window and its latency (Prediction.timings.total_ms,
        p50 and p95); None before the first prediction (no model to speak of) and when no prediction came
        since the last sample: inference stopped, and the same scores again would chart a model still
        serving."""
        with self._lock:
            if self.model is None or self._since_sample == 0:
                return None
            self._since_sample = 0
            totals = [p.timings.total_ms for p in self.window]
            p50, p95_ = (float(v) for v in np.percentile(totals, [50, 95])) if totals else (None, None)
            scores = self._measure() if len(totals) >= self.min_samples else {}
            return DriftSample(device=self.device, model=self.model, scores=scores, samples=len(totals),
                               latency_p50_ms=p50, latency_p95_ms=p95_, at=time.time() if now is None else now)

    def _observe(self, prediction: Prediction) -> list[Alert]:
        if prediction.cached:
            # A copy of an answer already taken: counted again it would weigh a static camera's scene
            # twice in the window and report 0 ms of model latency.
            return []
        if self.model is None or prediction.model.sha256 != self.model.sha256:
            return self._new_model(prediction)
        if self.baseline is None:
            self._collecting.append(prediction)
            if len(self._collecting) >= self.baseline_size:
                self.baseline = _baseline(self._collecting)
                self._collecting = []
            return []
        self.window.append(prediction)
        self._since_evaluation += 1
        if len(self.window) < self.min_samples or self._since_evaluation < self.evaluate_every:
            return []
        self._since_evaluation = 0
        return [alert for kind, value in self._measure().items() if (alert := self._judge(kind, value))]

    def _measure(self) -> dict[AlertType, float]:
        base, recent = self.baseline, list(self.window)
        if base is None:
            return {}
        values = {
            AlertType.PREDICTION_DRIFT: psi(base.labels, [p.top[0].label for p in recent]),
            AlertType.CONFIDENCE_DRIFT: base.confidence - (mean(p.top[0].score for p in recent) or 0.0),
            AlertType.LATENCY: (p95(p.timings.inference_ms for p in recent) or 0.0) / max(base.latency_p95, 1e-6),
        }
        features = [p.features for p in recent if p.features]
        if base.features is not None and base.feature_stds is not None and len(features) >= self.min_samples:
            shift = np.abs(np.mean(features, axis=0) - base.features) / np.maximum(base.feature_stds, 1e-6)
            values[AlertType.FEATURE_DRIFT] = float(shift.max())
        return values

    def _judge(self, kind: AlertType, value: float) -> Alert | None:
        rule = self.rules.get(kind)
        if rule is None:
            return None
        current = self.open.get(kind)
        if current is None and value > rule.raise_at:
            alert = self._alert(kind, AlertState.RAISED, value, rule.raise_at, uuid.uuid4().hex[:12], rule)
            self.open[kind] = alert
            return alert
        if current is not None and value < rule.clear_at:
            del self.open[kind]
            return self._alert(kind, AlertState.RESOLVED, value, rule.clear_at, current.alert_id, rule)
        return None

    def _alert(self, kind: AlertType, state: AlertState, value: float, threshold: float, alert_id: str,
               rule: Rule) -> Alert:
        severity = Severity.CRITICAL if state is AlertState.RAISED and value > 2 * threshold else Severity.WARNING
        verb = "above" if state is AlertState.RAISED else "back under"
        return Alert(
            device=self.device, alert_id=alert_id, type=kind, state=state, severity=severity,
            value=round(value, 4), threshold=threshold, window=len(self.window), model=self.model,
            detail=f"{rule.what} {value:.3f}, {verb} {threshold}", at=time.time(),
        )

    def _new_model(self, prediction: Prediction) -> list[Alert]:
        """A new model starts its own baseline; alerts about the old one end with it."""
        ended = [
            self._alert(kind, AlertState.RESOLVED, 0.0, self.rules[kind].clear_at, alert.alert_id, self.rules[kind])
            for kind, alert in self.open.items() if kind in self.rules
        ]
        self.open = {k: v for k, v in self.open.items() if k not in self.rules}
        self.model, self.baseline = prediction.model, None
        self._collecting, self.window = [prediction], deque(maxlen=self.window.maxlen)
        return ended


def _baseline(predictions: list[Prediction]) -> Baseline:
    features = [p.features for p in predictions if p.features]
    return Baseline(
        labels=[p.top[0].label for p in predictions],
        confidence=mean(p.top[0].score for p in predictions) or 0.0,
        features=np.mean(features, axis=0) if features else None,
        feature_stds=np.std(features, axis=0) if features else None,
        latency_p95=p95(p.timings.inference_ms for p in predictions) or 0.0,
    )


def rules_from(drift: DriftSettings) -> list[Rule]:
    return [
        Rule(AlertType.PREDICTION_DRIFT, drift.psi_raise, drift.psi_clear, "predicted-class PSI"),
        Rule(AlertType.CONFIDENCE_DRIFT, drift.confidence_raise, drift.confidence_clear, "mean confidence fell by"),
        Rule(AlertType.FEATURE_DRIFT, drift.feature_z_raise, drift.feature_z_clear,
             "input statistics shifted by (baseline std)"),
        Rule(AlertType.LATENCY, drift.latency_raise, drift.latency_clear, "p95 inference latency x baseline"),
    ]
