"""When telemetry takes a drift sample (pure logic, a real detector and a real outbox file): only while
predictions arrive, and only once the cloud's ingest has shown, by acknowledging with its store id, that
it knows drift samples (an older one would dead-letter the whole batch carrying one)."""

from __future__ import annotations

import time

from services.telemetry.drift import DriftDetector
from services.telemetry.service import TelemetryService
from shared.config import DriftSettings, TelemetrySettings
from shared.schemas import ClassScore, DriftSample, ModelRef, Prediction, ResourceSample, Timings

DEVICE = "edge-d"
STORE = "c" * 32


def _prediction(i: int) -> Prediction:
    return Prediction(
        device=DEVICE, camera="c", frame_id=f"f{i}", captured_at=None,
        top=[ClassScore(index=0, label="cat", score=0.9)],
        model=ModelRef(name="m", version=1, sha256="a" * 64), provider="CPUExecutionProvider",
        timings=Timings(queued_ms=0, preprocess_ms=1, inference_ms=10.0, total_ms=12.0, batch_size=1),
        published_at=0.0,
    )


def test_no_drift_sample_is_taken_when_no_prediction_arrived_since_the_last():
    detector = DriftDetector(DEVICE, DriftSettings(baseline=10, window=20, min_samples=10))
    for i in range(25):
        detector.observe(_prediction(i))
    assert detector.sample() is not None
    assert detector.sample() is None, "inference stopped: the same scores again would chart a live model"
    detector.observe(_prediction(99))
    again = detector.sample()
    assert again is not None and again.samples == 16


def test_drift_samples_are_queued_only_after_an_ack_that_names_a_store(tmp_path):
    service = TelemetryService(TelemetrySettings(device_id=DEVICE, mqtt_url="mqtt://127.0.0.1:1",
                                                 outbox={"path": tmp_path / "outbox.db"}))  # never started
    try:
        service.drift.observe(_prediction(1))
        service._sample_drift()
        assert service._pending == [], "an ingest older than DriftSample would dead-letter the batch"
        sample = ResourceSample(device=DEVICE, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4,
                                at=time.time())
        service.outbox.append([sample])
        service.outbox.ack(1, 1, None)  # an older ingest's ack: no store, no proof
        service.drift.observe(_prediction(2))
        service._sample_drift()
        assert service._pending == []
        service.outbox.append([sample])
        service.outbox.ack(2, 2, STORE)
        service.drift.observe(_prediction(3))
        service._sample_drift()
        assert [type(body) for body in service._pending] == [DriftSample]
    finally:
        service.outbox.close()
