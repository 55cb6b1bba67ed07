"""Prometheus metrics scraped over HTTP from the real `edgefleet telemetry` and `edgefleet cloud-ingest`
on the uplink rig (device Mosquitto bridged over TLS to the fleet's, a real S3 server), and the drift
samples a real telemetry service sends, fed by the real inference service answering real photos, as
they land in S3. Each service serves EDGEFLEET_METRICS_PORT=0 (a free port, named in its log)."""

from __future__ import annotations

import gzip
import json
import socket

from prometheus_client.samples import Sample

from edgefleet import photos
from shared import metrics as names
from shared.schemas import AlertType, DriftSample
from tests.support import check_metric_families, metric_family, metrics_url, scrape, wait_until
from tests.uplink import BUCKET

TELEMETRY_FAMILIES = (
    names.SERVICE_INFO, names.BROKER_CONNECTED, names.STATUS_TIMESTAMP, names.OUTBOX_RECORDS, names.OUTBOX_BYTES,
    names.OUTBOX_OLDEST_AGE, names.RECORDS_DROPPED, names.BATCHES_SENT, names.BATCHES_RESENT,
    names.RECORDS_ACKNOWLEDGED, names.ALERTS_OPEN, names.ALERTS_RAISED, names.CPU_RATIO, names.MEMORY_USED_BYTES,
    names.MEMORY_RATIO, names.DISK_RATIO,
)
INGEST_FAMILIES = (names.SERVICE_INFO, names.BROKER_CONNECTED, names.INGEST_BATCHES, names.INGEST_RECORDS,
                   names.INGEST_WRITE_SECONDS)
METRICS = {"metrics_port": "0", "metrics_host": "127.0.0.1"}


def _value(scraped: dict[str, list[Sample]], name: str, sample: str | None = None, **labels: str) -> float:
    """The sum of the family's samples named `sample` (default: the family's own name) with these labels."""
    wanted = sample or name
    return sum(s.value for s in metric_family(scraped, name)
               if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()))


def test_telemetry_and_ingest_serve_their_families_and_the_counters_move_between_scrapes(uplink):
    ingest = uplink.start_ingest(**METRICS)
    telemetry = uplink.start_telemetry(resource_interval_s="0.1", **METRICS)
    telemetry_url, ingest_url = metrics_url(telemetry), metrics_url(ingest)
    wait_until(lambda: (s := uplink.telemetry_stats()) is not None and s.records_acknowledged > 0, 60,
               "records acknowledged by the cloud")
    first_t, first_i = scrape(telemetry_url), scrape(ingest_url)
    check_metric_families(first_t, TELEMETRY_FAMILIES, uplink.device_id)
    # A replica's device label is its replica id, as in its status topic: replicas sharing a configured id
    # (compose `replicas: 2`) are told apart by their host names.
    check_metric_families(first_i, INGEST_FAMILIES, f"ingest-1-{socket.gethostname()}"[:64])
    assert _value(first_t, names.BROKER_CONNECTED) == 1
    assert 0 <= _value(first_t, names.CPU_RATIO) <= 1 and 0 < _value(first_t, names.MEMORY_RATIO) < 1
    assert {s.labels["reason"] for s in metric_family(first_t, names.RECORDS_DROPPED)} >= {"queue_full", "expired"}
    assert {s.labels["type"] for s in metric_family(first_t, names.ALERTS_OPEN)} == {t.value for t in AlertType}

    def moved() -> bool:
        t, i = scrape(telemetry_url), scrape(ingest_url)
        return (_value(t, names.BATCHES_SENT) > _value(first_t, names.BATCHES_SENT)
                and _value(t, names.RECORDS_ACKNOWLEDGED) > _value(first_t, names.RECORDS_ACKNOWLEDGED)
                and _value(i, names.INGEST_BATCHES, outcome="stored") > _value(first_i, names.INGEST_BATCHES,
                                                                                 outcome="stored")
                and _value(i, names.INGEST_RECORDS) > _value(first_i, names.INGEST_RECORDS)
                and _value(i, names.INGEST_WRITE_SECONDS, f"{names.INGEST_WRITE_SECONDS}_count")
                > _value(first_i, names.INGEST_WRITE_SECONDS, f"{names.INGEST_WRITE_SECONDS}_count"))

    wait_until(moved, 30, "the counters of both services to move between two scrapes")
    # What the device's own status says and what Prometheus reads are the same counters.
    status, scraped = uplink.telemetry_stats(), scrape(telemetry_url)
    assert _value(scraped, names.RECORDS_ACKNOWLEDGED) >= status.records_acknowledged > 0
    assert telemetry.terminate() == 0
    assert ingest.terminate() == 0


def _drift_samples(uplink) -> list[DriftSample]:
    found = []
    for key in uplink.objects("telemetry/drift/"):
        body = gzip.decompress(uplink.store.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        found += [DriftSample.model_validate(json.loads(line)["body"]) for line in body.splitlines()]
    return found


def test_drift_samples_of_the_served_model_reach_s3_every_interval(uplink, start_inference):
    uplink.start_ingest()
    start_inference(uplink.device_broker, device_id=uplink.device_id)
    telemetry = uplink.start_telemetry(drift_sample_interval_s="0.5", drift_baseline="10", drift_window="10",
                                       drift_min_samples="5", **METRICS)
    sent = iter(range(1_000_000))

    def serving() -> list[DriftSample]:
        """One more frame each time (a sample is taken only in an interval in which a prediction came, and
        only once the store has acknowledged a batch by its id), then the full-window samples in S3."""
        i = next(sent)
        uplink.device.publish_envelope("yard", f"d{i}", photos.jpeg(photos.BUNDLED[i % len(photos.BUNDLED)]))
        return (full := [s for s in _drift_samples(uplink) if s.samples >= 10])[1:] and full

    samples = wait_until(serving, 60, "two drift samples measured over a full window, in S3", interval=0.1)
    served = uplink.device.predictions[-1].model
    sample = max(samples, key=lambda s: s.at)
    assert sample.device == uplink.device_id and sample.model == served
    assert {AlertType.PREDICTION_DRIFT, AlertType.CONFIDENCE_DRIFT, AlertType.LATENCY} <= set(sample.scores)
    assert 0 < sample.latency_p50_ms <= sample.latency_p95_ms
    # The model's answers after its baseline of 10 (the scene cache's copies are not measured): the
    # window's p50 is one of theirs, or between two of them.
    measured = [p.timings.total_ms for p in uplink.device.predictions if not p.cached][10:]
    assert min(measured) <= sample.latency_p50_ms <= max(measured)
    every = _drift_samples(uplink)
    assert len({s.at for s in every}) == len(every), "one sample per interval, each stored once"
    # The metrics read the same detector: its scores are served as gauges too.
    scraped = scrape(metrics_url(telemetry))
    assert {s.labels["measure"] for s in metric_family(scraped, names.DRIFT_SCORE)} >= {"prediction_drift", "latency"}
    assert telemetry.terminate() == 0
