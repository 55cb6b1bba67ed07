"""The telemetry and cloud_ingest Prometheus collectors, read as Prometheus reads them (the text format,
parsed back): pure logic on a real outbox file, a real drift detector and real counters, in this process.
The families scraped from the running services over HTTP are in tests/test_telemetry_metrics_scrape.py."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.cloud_ingest.metrics import IngestCollector, IngestCounters, Outcome, write_seconds
from services.telemetry.drift import DriftDetector
from services.telemetry.forwarder import Forwarder
from services.telemetry.metrics import AlertCounts, TelemetryCollector
from services.telemetry.outbox import Outbox
from shared import metrics
from shared.config import BatchSettings, CommonSettings, DriftSettings, ForwardSettings
from shared.mqtt import MqttLink
from shared.schemas import (
    Alert,
    AlertState,
    AlertType,
    ClassScore,
    ContainerSample,
    GapReason,
    ModelRef,
    Prediction,
    ResourceSample,
    Severity,
    Timings,
)

DEVICE = "edge-m"


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's text exposition: (sample name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(scraped, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted({metrics.DEVICE_LABEL: DEVICE, **labels}.items())))]


def _sample(at: float, **fields) -> ResourceSample:
    return ResourceSample(device=DEVICE, cpu_percent=37.5, memory_percent=62.0, memory_used_bytes=3 << 30,
                          disk_percent=41.0, at=at, **fields)


def _prediction(i: int, label: str, total_ms: float) -> Prediction:
    return Prediction(
        device=DEVICE, camera="c", frame_id=f"f{i}", captured_at=None,
        top=[ClassScore(index=0, label=label, score=0.9)],
        model=ModelRef(name="m", version=1, sha256="a" * 64), provider="CPUExecutionProvider",
        timings=Timings(queued_ms=0, preprocess_ms=1, inference_ms=10.0, total_ms=total_ms, batch_size=1),
        published_at=0.0,
    )


class _Telemetry:
    """The parts the telemetry service reads its families from, real, on a file in tmp_path."""

    def __init__(self, tmp_path, max_bytes: int = 1 << 30) -> None:
        self.outbox = Outbox(tmp_path / "outbox.db", DEVICE, max_bytes)
        link = MqttLink(CommonSettings(mqtt_url="mqtt://127.0.0.1:1", device_id=DEVICE), "test")  # never started
        self.forwarder = Forwarder(self.outbox, link, DEVICE, batch=BatchSettings(), forward=ForwardSettings(),
                                   ack_timeout_s=1.0)
        self.drift = DriftDetector(DEVICE, DriftSettings(baseline=10, window=20, min_samples=10))
        self.alerts = AlertCounts()
        self.open: list[AlertType] = []
        self.resources: ResourceSample | None = None
        self.registry = CollectorRegistry()
        self.registry.register(TelemetryCollector(
            device=DEVICE, outbox=self.outbox, forwarder=self.forwarder, drift=self.drift, alerts=self.alerts,
            open_alerts=lambda: self.open, resources=lambda: self.resources))


def test_outbox_families_follow_the_outbox_and_the_oldest_record_age_is_its_age(tmp_path):
    t = _Telemetry(tmp_path)
    empty = _scrape(t.registry)
    assert _value(empty, metrics.OUTBOX_RECORDS) == 0 and _value(empty, metrics.OUTBOX_OLDEST_AGE) == 0
    t.outbox.append([_sample(time.time() - 120)] + [_sample(time.time())] * 4)
    held = _scrape(t.registry)
    assert _value(held, metrics.OUTBOX_RECORDS) == 5
    assert _value(held, metrics.OUTBOX_BYTES) == t.outbox.stats.bytes > 0
    assert 120 <= _value(held, metrics.OUTBOX_OLDEST_AGE) < 180  # the first record's, made 2 minutes ago
    batch = t.outbox.next_batch(1, 1 << 20)
    t.outbox.ack(batch[0].seq, batch[-1].seq)
    acked = _scrape(t.registry)
    assert _value(acked, metrics.OUTBOX_RECORDS) == 4
    assert _value(acked, metrics.OUTBOX_OLDEST_AGE) < 60  # the old one is gone: the next one's age now


def test_records_dropped_count_by_gap_reason_and_forwarder_counters_move(tmp_path):
    t = _Telemetry(tmp_path, max_bytes=2000)
    before = _scrape(t.registry)
    assert all(_value(before, metrics.RECORDS_DROPPED, reason=r.value) == 0 for r in GapReason)
    for _ in range(10):
        t.outbox.append([_sample(time.time())] * 5)
    dropped = t.outbox.stats.dropped[GapReason.QUEUE_FULL.value]
    t.forwarder.sent_batches.add(3)
    t.forwarder.resent_batches.add()
    t.forwarder.acked_records.add(42)
    after = _scrape(t.registry)
    assert dropped > 0 and _value(after, metrics.RECORDS_DROPPED, reason="queue_full") == dropped
    assert _value(after, metrics.RECORDS_DROPPED, reason="expired") == 0
    assert _value(after, metrics.BATCHES_SENT) == 3 and _value(after, metrics.BATCHES_RESENT) == 1
    assert _value(after, metrics.RECORDS_ACKNOWLEDGED) == 42


def test_drift_scores_are_the_detectors_measures_and_alerts_count_by_type(tmp_path):
    t = _Telemetry(tmp_path)
    assert not [k for k in _scrape(t.registry) if k[0] == metrics.DRIFT_SCORE]  # no baseline: no score
    for i in range(10):
        t.drift.observe(_prediction(i, "cat", 5.0))
    for i in range(20):
        t.drift.observe(_prediction(100 + i, "dog" if i % 2 else "cat", 5.0))
    measured = t.drift.measure()
    scraped = _scrape(t.registry)
    assert measured[AlertType.PREDICTION_DRIFT] > 0.1
    for kind, value in measured.items():
        assert abs(_value(scraped, metrics.DRIFT_SCORE, measure=kind.value) - value) < 1e-9
    alert = Alert(device=DEVICE, alert_id="a1", type=AlertType.PREDICTION_DRIFT, state=AlertState.RAISED,
                  severity=Severity.WARNING, value=0.3, threshold=0.25, window=20, detail="d", at=time.time())
    t.alerts.count(alert)
    t.alerts.count(alert.model_copy(update={"state": AlertState.RESOLVED}))  # an end is not a raise
    t.open = [AlertType.PREDICTION_DRIFT]
    scraped = _scrape(t.registry)
    assert _value(scraped, metrics.ALERTS_RAISED, type="prediction_drift") == 1
    assert _value(scraped, metrics.ALERTS_OPEN, type="prediction_drift") == 1
    assert _value(scraped, metrics.ALERTS_OPEN, type="latency") == 0
    assert _value(scraped, metrics.ALERTS_RAISED, type="latency") == 0


def test_resource_families_are_the_last_sample_as_ratios_and_absent_before_one(tmp_path):
    t = _Telemetry(tmp_path)
    assert not [k for k in _scrape(t.registry) if k[0] == metrics.CPU_RATIO]
    t.resources = _sample(time.time(), temperatures_c={"cpu_thermal": 51.5},
                          containers=[ContainerSample(name="edgefleet-inference-1", cpu_percent=150.0,
                                                      memory_bytes=300 << 20)])
    scraped = _scrape(t.registry)
    assert _value(scraped, metrics.CPU_RATIO) == 0.375
    assert _value(scraped, metrics.MEMORY_RATIO) == 0.62 and _value(scraped, metrics.DISK_RATIO) == 0.41
    assert _value(scraped, metrics.MEMORY_USED_BYTES) == 3 << 30
    assert _value(scraped, metrics.TEMPERATURE, sensor="cpu_thermal") == 51.5
    assert _value(scraped, metrics.CONTAINER_CPU_RATIO, container="edgefleet-inference-1") == 1.5
    assert _value(scraped, metrics.CONTAINER_MEMORY_BYTES, container="edgefleet-inference-1") == 300 << 20


def test_every_telemetry_sample_carries_the_device_label(tmp_path):
    t = _Telemetry(tmp_path)
    t.resources = _sample(time.time())
    t.outbox.append([_sample(time.time())])
    scraped = _scrape(t.registry)
    assert scraped and all(dict(labels).get(metrics.DEVICE_LABEL) == DEVICE for _, labels in scraped)
    assert {name.removesuffix("_total") for name, _ in scraped} <= {n.removesuffix("_total") for n in metrics.ALL}


def test_a_drift_sample_holds_the_scores_the_window_and_its_latency_percentiles():
    detector = DriftDetector(DEVICE, DriftSettings(baseline=10, window=20, min_samples=10))
    assert detector.sample() is None  # no prediction yet: no model to speak of
    for i in range(10):
        detector.observe(_prediction(i, "cat", 5.0))
    baseline_only = detector.sample()
    assert baseline_only is not None and baseline_only.samples == 0 and baseline_only.latency_p50_ms is None
    for i in range(9):  # fewer than min_samples: latency, but no verdict on drift yet
        detector.observe(_prediction(50 + i, "dog", 3.0))
    too_few = detector.sample()
    assert too_few is not None and too_few.samples == 9 and too_few.scores == {} and too_few.latency_p50_ms == 3.0
    detector = DriftDetector(DEVICE, DriftSettings(baseline=10, window=20, min_samples=10))
    for i in range(10):
        detector.observe(_prediction(i, "cat", 5.0))
    totals = [float(t) for t in range(1, 16)]
    for i, total in enumerate(totals):
        detector.observe(_prediction(100 + i, "dog", total))
    sample = detector.sample(now=123.0)
    assert sample is not None and sample.kind == "drift" and sample.at == 123.0
    assert sample.samples == 15 and sample.model == ModelRef(name="m", version=1, sha256="a" * 64)
    assert sample.scores == detector.measure() and sample.scores[AlertType.PREDICTION_DRIFT] > 1
    assert sample.latency_p50_ms == np.percentile(totals, 50) and sample.latency_p95_ms == np.percentile(totals, 95)


def test_ingest_counts_batches_by_outcome_records_and_times_its_flushes():
    registry, counters = CollectorRegistry(), IngestCounters()
    registry.register(IngestCollector(DEVICE, counters))
    histogram = write_seconds(DEVICE, registry)
    counters.stored(2, 30)  # one flush: two batches, 30 records
    counters.batches[Outcome.DUPLICATE].add()  # sent again (its ack lost): acknowledged, not written
    counters.batches[Outcome.DEAD_LETTERED].add()
    histogram.observe(0.012)
    scraped = _scrape(registry)
    assert _value(scraped, metrics.INGEST_BATCHES, outcome="stored") == 2
    assert _value(scraped, metrics.INGEST_BATCHES, outcome="duplicate") == 1
    assert _value(scraped, metrics.INGEST_BATCHES, outcome="dead_lettered") == 1
    assert _value(scraped, metrics.INGEST_BATCHES, outcome="failed") == 0
    assert _value(scraped, metrics.INGEST_RECORDS) == 30
    assert _value(scraped, metrics.INGEST_WRITE_SECONDS + "_count") == 1
    assert _value(scraped, metrics.INGEST_WRITE_SECONDS + "_bucket", le="0.015") == 1
    assert _value(scraped, metrics.INGEST_WRITE_SECONDS + "_bucket", le="0.01") == 0
