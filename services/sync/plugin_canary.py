"""The plugin canary: after a plugin is switched in, count the predictions inference publishes and the
faults it reports for that plugin (error reports PLUGIN_FAULT / PLUGIN_DISABLED naming its SHA-256).

A plugin does not change the model, so there is no 'before' to compare with (the model canary's job,
canary.py): the plugin is judged on its own fault rate over its window. A plugin inference disabled
(too many faults in its fault window) fails at once; too few predictions is no verdict.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from shared.config import CanarySettings
from shared.schemas import CanaryVerdict, ErrorReason, ErrorReport, Prediction


@dataclass(frozen=True)
class PluginWindow:
    """What one plugin did since it was switched in."""

    predictions: int = 0
    faults: int = 0
    disabled: bool = False

    @property
    def fault_rate(self) -> float:
        return self.faults / self.predictions if self.predictions else (1.0 if self.faults else 0.0)


class PluginWatch:
    """Counts for the plugin on trial, fed from the MQTT thread and read by the plugin worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sha256: str | None = None
        self._since = 0.0
        self._window = PluginWindow()

    def start(self, sha256: str, since: float) -> None:
        """Counts for plugin `sha256` from now: predictions published at or after `since` (wall clock)."""
        with self._lock:
            self._sha256, self._since, self._window = sha256, since, PluginWindow()

    def stop(self) -> None:
        with self._lock:
            self._sha256 = None

    def on_prediction(self, prediction: Prediction) -> None:
        with self._lock:
            if self._sha256 is not None and prediction.published_at >= self._since:
                w = self._window
                self._window = PluginWindow(w.predictions + 1, w.faults, w.disabled)

    def on_error(self, report: ErrorReport) -> None:
        """Charges a plugin fault (or the plugin's disabling) to the plugin on trial, if the report names it."""
        with self._lock:
            if self._sha256 is None or report.plugin is None or report.plugin.sha256 != self._sha256:
                return
            w = self._window
            if report.reason is ErrorReason.PLUGIN_FAULT:
                self._window = PluginWindow(w.predictions, w.faults + 1, w.disabled)
            elif report.reason is ErrorReason.PLUGIN_DISABLED:
                self._window = PluginWindow(w.predictions, w.faults, True)

    def snapshot(self, sha256: str) -> PluginWindow:
        """The window of plugin `sha256` (empty if it is not the one watched)."""
        with self._lock:
            return self._window if sha256 == self._sha256 else PluginWindow()


def judge(window: PluginWindow, limits: CanarySettings) -> CanaryVerdict:
    """Passed: at least min_samples predictions, a fault rate at most max_error_rate, never disabled.
    Too few predictions (and no other reason to fail) is inconclusive, never passed."""
    reasons = []
    if window.disabled:
        reasons.append("inference disabled the plugin after repeated faults")
    if window.fault_rate > limits.max_error_rate:
        reasons.append(f"fault rate {window.fault_rate:.1%} ({window.faults} faults in {window.predictions} "
                       f"predictions) > {limits.max_error_rate:.1%}")
    conclusive = window.predictions >= limits.min_samples or bool(reasons)
    if not conclusive:
        reasons.append(f"inconclusive: {window.predictions} predictions after the switch, minimum {limits.min_samples}")
    return CanaryVerdict(
        samples_before=0, samples_after=window.predictions, error_rate_before=0.0,
        error_rate_after=round(window.fault_rate, 4), latency_p95_before_ms=None, latency_p95_after_ms=None,
        mean_confidence_before=None, mean_confidence_after=None, prediction_psi=None, passed=not reasons,
        reasons=reasons, conclusive=conclusive,
    )
