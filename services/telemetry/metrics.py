"""The telemetry service's Prometheus families (names in shared.metrics), all read at scrape time from
what the service already keeps: the outbox's counters and its oldest record, the forwarder's counters,
the drift detector's scores (measure()), the alerts open and raised, and the last resource sample (the
one the service queued: psutil's CPU figure is a delta since its previous call, so a scrape taking its
own would skew the samples the cloud gets)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.telemetry.drift import DriftDetector
from services.telemetry.forwarder import Forwarder
from services.telemetry.outbox import Outbox
from shared import metrics
from shared.metrics import Counter
from shared.schemas import Alert, AlertState, AlertType, GapReason, ResourceSample


class AlertCounts:
    """Alerts raised since the process started, by type (ALERTS_RAISED)."""

    def __init__(self) -> None:
        self.raised = {kind: Counter() for kind in AlertType}

    def count(self, alert: Alert) -> None:
        if alert.state is AlertState.RAISED:
            self.raised[alert.type].add()


class TelemetryCollector(Collector):
    """Every telemetry family, with the device label.

    :param str device: the device id.
    :param Outbox outbox: its stats and oldest_at().
    :param Forwarder forwarder: its batch and acknowledgement counters.
    :param DriftDetector drift: measure() for DRIFT_SCORE.
    :param AlertCounts alerts: ALERTS_RAISED.
    :param open_alerts: the types of the alerts open now (drift's and the provider fallback's).
    :param resources: the last resource sample taken, None before the first.
    """

    def __init__(self, *, device: str, outbox: Outbox, forwarder: Forwarder, drift: DriftDetector,
                 alerts: AlertCounts, open_alerts: Callable[[], Iterable[AlertType]],
                 resources: Callable[[], ResourceSample | None]) -> None:
        self.device, self.outbox, self.forwarder, self.drift = device, outbox, forwarder, drift
        self.alerts, self.open_alerts, self.resources = alerts, open_alerts, resources

    def collect(self) -> Iterable[Metric]:
        for family in (*self._outbox(), *self._forwarder(), *self._drift(), *self._resources()):
            yield metrics.labelled(family, self.device)

    def _outbox(self) -> Iterable[Metric]:
        stats = self.outbox.stats
        yield GaugeMetricFamily(metrics.OUTBOX_RECORDS, "Records in the outbox, waiting for the cloud.",
                                value=stats.records)
        yield GaugeMetricFamily(metrics.OUTBOX_BYTES, "Bytes of the records in the outbox.", value=stats.bytes)
        oldest = self.outbox.oldest_at()
        yield GaugeMetricFamily(metrics.OUTBOX_OLDEST_AGE, "Age of the oldest record in the outbox (0 when empty).",
                                value=max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        dropped = CounterMetricFamily(metrics.RECORDS_DROPPED, "Records the outbox gave up, by the gap reason "
                                      "it declared to the cloud.", labels=["reason"])
        for reason in GapReason:
            dropped.add_metric([reason.value], stats.dropped.get(reason.value, 0))
        yield dropped

    def _forwarder(self) -> Iterable[Metric]:
        f = self.forwarder
        yield CounterMetricFamily(metrics.BATCHES_SENT, "Batches sent to the cloud for the first time.",
                                  value=f.sent_batches.value)
        yield CounterMetricFamily(metrics.BATCHES_RESENT, "Batches sent again (not acknowledged in time).",
                                  value=f.resent_batches.value)
        yield CounterMetricFamily(metrics.RECORDS_ACKNOWLEDGED, "Records the cloud acknowledged (stored in S3).",
                                  value=f.acked_records.value)

    def _drift(self) -> Iterable[Metric]:
        scores = GaugeMetricFamily(metrics.DRIFT_SCORE, "The drift detector's measures of the recent window "
                                   "against the model's baseline (none before the baseline).", labels=["measure"])
        for kind, value in sorted(self.drift.measure().items()):
            scores.add_metric([kind.value], value)
        yield scores
        open_now = set(self.open_alerts())
        opened = GaugeMetricFamily(metrics.ALERTS_OPEN, "1 while an alert of the type is open.", labels=["type"])
        raised = CounterMetricFamily(metrics.ALERTS_RAISED, "Alerts raised, by type.", labels=["type"])
        for kind in AlertType:
            opened.add_metric([kind.value], 1.0 if kind in open_now else 0.0)
            raised.add_metric([kind.value], self.alerts.raised[kind].value)
        yield opened
        yield raised

    def _resources(self) -> Iterable[Metric]:
        sample = self.resources()
        if sample is None:  # none taken yet: no figure rather than a made-up 0
            return
        yield GaugeMetricFamily(metrics.CPU_RATIO, "CPU busy, of the whole machine (0..1).",
                                value=sample.cpu_percent / 100)
        yield GaugeMetricFamily(metrics.MEMORY_USED_BYTES, "Memory in use.", value=sample.memory_used_bytes)
        yield GaugeMetricFamily(metrics.MEMORY_RATIO, "Memory in use, of the whole (0..1).",
                                value=sample.memory_percent / 100)
        yield GaugeMetricFamily(metrics.DISK_RATIO, "Disk used where the outbox lives (0..1).",
                                value=sample.disk_percent / 100)
        temperatures = GaugeMetricFamily(metrics.TEMPERATURE, "Temperature by sensor.", labels=["sensor"])
        for sensor, celsius in sorted(sample.temperatures_c.items()):
            temperatures.add_metric([sensor], celsius)
        yield temperatures
        cpu = GaugeMetricFamily(metrics.CONTAINER_CPU_RATIO, "A container's CPU, of one core (as docker stats).",
                                labels=["container"])
        memory = GaugeMetricFamily(metrics.CONTAINER_MEMORY_BYTES, "A container's memory (as docker stats).",
                                   labels=["container"])
        for container in sample.containers:  # at most resources.MAX_CONTAINERS: a bounded label set
            cpu.add_metric([container.name], container.cpu_percent / 100)
            memory.add_metric([container.name], container.memory_bytes)
        yield cpu
        yield memory
