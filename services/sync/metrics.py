"""The sync service's Prometheus families (names in shared/metrics.py): the model rollout's state as
a gauge per SyncState value (1 for the current one), the states entered, rollbacks and the bytes
downloaded. Fed by the service's retained reports and its downloads; every label value is a SyncState."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared import metrics as names
from shared.metrics import DEVICE_LABEL
from shared.schemas import SyncState


class SyncMetrics:
    """The model rollout's families, registered in `registry`.

    :param CollectorRegistry registry: the service's registry.
    :param str device: the device id (the `device` label).
    """

    def __init__(self, registry: CollectorRegistry, device: str) -> None:
        labels = [DEVICE_LABEL, "state"]
        state = Gauge(names.SYNC_STATE, "1 for the model rollout's current state, 0 for the others.", labels,
                      registry=registry)
        transitions = Counter(names.SYNC_TRANSITIONS, "Times the model rollout entered each state.", labels,
                              registry=registry)
        # Every state's series exists from the start, at 0: a query never meets a missing one.
        self._state = {s: state.labels(device, s.value) for s in SyncState}
        self._transitions = {s: transitions.labels(device, s.value) for s in SyncState}
        self._rollbacks = Counter(names.SYNC_ROLLBACKS, "Model rollouts this device rolled back.", [DEVICE_LABEL],
                                  registry=registry).labels(device)
        self._downloaded = Counter(names.SYNC_DOWNLOADED_BYTES, "Bytes downloaded from the registry (models "
                                   "and plugins).", [DEVICE_LABEL], registry=registry).labels(device)
        self._current: SyncState | None = None
        self._lock = threading.Lock()  # reports come from the main thread at start, then the rollout worker

    @property
    def current(self) -> SyncState | None:
        """The state last reported, None before the first report."""
        return self._current

    def reported(self, state: SyncState) -> None:
        """Takes one retained report's state: a state other than the current one is entered (a repeated
        report, e.g. download progress, is not)."""
        with self._lock:
            if state is self._current:
                return
            if self._current is not None:
                self._state[self._current].set(0)
            self._current = state
            self._state[state].set(1)
            self._transitions[state].inc()
            if state is SyncState.ROLLED_BACK:
                self._rollbacks.inc()

    def downloaded(self, n: int) -> None:
        """Counts n more bytes fetched from the registry (n >= 0)."""
        self._downloaded.inc(n)
