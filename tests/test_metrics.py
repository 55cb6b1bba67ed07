"""Prometheus metrics scraped over HTTP from the real services: `edgefleet inference` with the real
model answering real photos over a real Mosquitto, and `edgefleet sync` taking a real rollout from a
real S3 registry. Each serves EDGEFLEET_METRICS_PORT=0 (a free port, named in its log)."""

from __future__ import annotations

import socket

import pytest
from prometheus_client.samples import Sample

from edgefleet import photos
from shared import metrics as names
from shared.schemas import SyncState
from tests.delivery import model_variant
from tests.support import Device, check_metric_families, metric_family, metrics_url, scrape, wait_until

INFERENCE_FAMILIES = (
    names.SERVICE_INFO, names.BROKER_CONNECTED, names.STATUS_TIMESTAMP,
    names.FRAMES_RECEIVED, names.FRAMES_DROPPED, names.FRAMES_REJECTED, names.PREDICTIONS, names.PREDICTIONS_LOST,
    names.PREDICTIONS_CACHED, names.CASCADE_ANSWERS, names.PREDICTIONS_DROPPED_BY_PLUGINS, names.BATCHES,
    names.QUEUE_DEPTH, names.QUEUE_SECONDS, names.DECODE_SECONDS, names.MODEL_SECONDS, names.TOTAL_SECONDS,
    names.MODEL_INFO, names.PROVIDER_FALLBACK, names.MODEL_SWAPS, names.PLUGIN_CALLS, names.PLUGIN_FAULTS,
)
SYNC_FAMILIES = (names.SERVICE_INFO, names.BROKER_CONNECTED, names.STATUS_TIMESTAMP, names.SYNC_STATE,
                 names.SYNC_TRANSITIONS, names.SYNC_ROLLBACKS, names.SYNC_DOWNLOADED_BYTES)


def _scrape_after_a_status(url: str) -> dict[str, list[Sample]]:
    """A scrape once the service has published a status (before it, the status time has no sample)."""
    def scraped() -> dict[str, list[Sample]] | None:
        samples = scrape(url)
        return samples if names.STATUS_TIMESTAMP in samples else None

    return wait_until(scraped, 30, "a status time in the metrics")


def _total(scraped: dict[str, list[Sample]], name: str, sample: str, /, **labels: str) -> float:
    return sum(s.value for s in metric_family(scraped, name)
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_inference_serves_every_family_and_its_counters_and_histograms_grow(broker, start_inference):
    service, device = start_inference(broker, metrics_port=0, inference_workers=1)
    url = metrics_url(service)
    for i in range(3):
        device.publish_envelope("door", f"door-{i}", photos.jpeg("chelsea"))
    for i in range(3):
        device.prediction_for(f"door-{i}")
    device.publish_frame("yard", b"not an image")
    device.error_for("yard")
    first = _scrape_after_a_status(url)

    check_metric_families(first, INFERENCE_FAMILIES, device.device_id, with_samples=False)
    assert _total(first, names.FRAMES_RECEIVED, names.FRAMES_RECEIVED, camera="door") == 3
    assert _total(first, names.FRAMES_RECEIVED, names.FRAMES_RECEIVED, camera="yard") == 1
    assert _total(first, names.FRAMES_REJECTED, names.FRAMES_REJECTED, reason="malformed_envelope") == 1
    assert _total(first, names.PREDICTIONS, names.PREDICTIONS, camera="door") == 3
    assert _total(first, names.MODEL_SECONDS, f"{names.MODEL_SECONDS}_count") == 3
    assert _total(first, names.BROKER_CONNECTED, names.BROKER_CONNECTED) == 1
    served = device.latest_status().model
    assert _total(first, names.MODEL_INFO, f"{names.MODEL_INFO}_info", name=served.name, version=str(served.version),
                  provider="CPUExecutionProvider") == 1

    for i in range(3, 5):
        device.publish_envelope("door", f"door-{i}", photos.png("coffee"))
        device.prediction_for(f"door-{i}")
    second = scrape(url)

    assert _total(second, names.FRAMES_RECEIVED, names.FRAMES_RECEIVED, camera="door") == 5
    assert _total(second, names.PREDICTIONS, names.PREDICTIONS, camera="door") == 5
    assert _total(second, names.BATCHES, names.BATCHES) > _total(first, names.BATCHES, names.BATCHES)
    for histogram in (names.QUEUE_SECONDS, names.DECODE_SECONDS, names.MODEL_SECONDS, names.TOTAL_SECONDS):
        assert _total(second, histogram, f"{histogram}_count") == 5, histogram
        assert _total(second, histogram, f"{histogram}_sum") > _total(first, histogram, f"{histogram}_sum")
    assert service.terminate() == 0


def test_a_metrics_port_in_use_is_a_start_failure_naming_the_key(broker, start_inference):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service, _ = start_inference(broker, wait_online=False, metrics_port=taken.getsockname()[1])
        assert service.proc.wait(60) == 3
    assert "cannot start: EDGEFLEET_METRICS_PORT" in service.log()


@pytest.fixture
def rebuilt(model_dir, tmp_path):
    """v2: the same network, a new artifact."""
    return model_variant(model_dir, tmp_path / "v2", "rebuilt", version=2)


def test_sync_serves_its_state_and_counts_the_states_and_bytes_of_a_rollout(fleet, model_dir, rebuilt):
    fleet.publish(model_dir)
    v2 = fleet.publish(rebuilt)
    device = Device(fleet.broker.url, "edge-m")
    # No inference on this device: the rollout waits at "installed" for the canary's baseline.
    sync = fleet.start_sync("edge-m", model_dir, metrics_port=0, canary_timeout_s=600)
    url = metrics_url(sync)
    device.sync_report(lambda r: r.state == "idle", "the idle report at start", 60)
    first = _scrape_after_a_status(url)

    check_metric_families(first, SYNC_FAMILIES, "edge-m", with_samples=False)
    assert {s.labels["state"] for s in first[names.SYNC_STATE]} == {s.value for s in SyncState}
    assert [s.labels["state"] for s in first[names.SYNC_STATE] if s.value == 1] == ["idle"]
    assert _total(first, names.SYNC_DOWNLOADED_BYTES, names.SYNC_DOWNLOADED_BYTES) == 0

    fleet.rollout("efficientnet-lite0", 2, "r-metrics")
    device.sync_report(lambda r: r.rollout_id == "r-metrics" and r.state == "installed", "the rollout installed", 60)
    second = scrape(url)

    assert [s.labels["state"] for s in second[names.SYNC_STATE] if s.value == 1] == ["installed"]
    for state in ("received", "downloading", "verified", "installed"):
        assert _total(second, names.SYNC_TRANSITIONS, names.SYNC_TRANSITIONS, state=state) == 1, state
    assert _total(second, names.SYNC_DOWNLOADED_BYTES, names.SYNC_DOWNLOADED_BYTES) == v2.size_bytes
    assert _total(second, names.SYNC_ROLLBACKS, names.SYNC_ROLLBACKS) == 0
    device.close()
