"""The console's drift charts read from a real S3 server (moto in its own process): listed device by
device, so a device writing many objects a day cannot hide the others' behind its own in key order."""

from __future__ import annotations

import gzip
import time

from services.console import charts as drift_charts
from shared import lake, s3
from shared.schemas import AlertType, DriftSample, ModelRef, TelemetryRecord

BUCKET = "edgefleet-telemetry"
MODEL = ModelRef(name="efficientnet-lite0", version=1, sha256="a" * 64)


def _put(client, device: str, at: float, seq: int) -> None:
    sample = DriftSample(device=device, model=MODEL, scores={AlertType.PREDICTION_DRIFT: 0.1}, samples=10,
                         latency_p50_ms=5.0, latency_p95_ms=9.0, at=at)
    body = gzip.compress(TelemetryRecord(seq=seq, body=sample).model_dump_json().encode())
    client.put_object(Bucket=BUCKET, Key=lake.records_key("drift", at, device, f"0123abcd-{seq:012d}-{seq:012d}"),
                      Body=body)


def test_a_busy_device_does_not_hide_a_quiet_ones_objects_and_a_cap_reached_says_truncated(s3_server, monkeypatch):
    # The caps scaled down: a device over its cap stands for one sampling every 30 s for a day (~2,880).
    monkeypatch.setattr(drift_charts, "MAX_KEYS_PER_DEVICE", 30)
    monkeypatch.setattr(drift_charts, "MAX_KEYS_LISTED", 35)
    client = s3.client(s3_server.settings())
    client.create_bucket(Bucket=BUCKET)
    now = time.time()
    for seq in range(1, 41):  # "busy" sorts before "quiet": in key order its 40 objects come first
        _put(client, "busy", now - 60 + seq, seq)
    for seq in (1, 2):
        _put(client, "quiet", now - 30 + seq, seq)
    snapshot = drift_charts.DriftCharts(client, BUCKET, window_s=3600).refresh()
    charted = {d.device: d for d in snapshot.devices}
    assert set(charted) == {"busy", "quiet"}
    assert len(charted["quiet"].at) == 2
    assert len(charted["busy"].at) == 30  # its listing stopped at its cap ...
    assert snapshot.truncated  # ... and the snapshot says so


def _flush(client, made: float, seq: int, devices: tuple[str, ...], samples: int = 1,
           at: float | None = None, detail: str = "") -> None:
    """A flush written by replica ingest-1 as cloud_ingest writes it, its id made at `made` (the replica's
    clock): each device's batch of `samples` drift samples (at `at`, or `made`, one second apart)."""
    from services.cloud_ingest.flush import Flush, Pending
    from services.cloud_ingest.writer import write_flush
    from shared.schemas import TelemetryBatch

    first = made if at is None else at
    written = Flush(opened=time.monotonic(), flush_id=lake.flush_id(made, f"{seq:08x}"))
    for d in devices:
        batch = TelemetryBatch(device=d, epoch="0a0b0c0d", sent_at=made, records=[TelemetryRecord(
            seq=seq * 100_000 + i, body=DriftSample(device=d, model=MODEL, scores={AlertType.PREDICTION_DRIFT: 0.1},
                                                    samples=10, at=first - samples + 1 + i))
            for i in range(samples)])
        written.batches[(batch.device, batch.batch_id)] = Pending.of(batch, None)
    write_flush(client, BUCKET, "ingest-1", written)


def test_a_replicas_flushes_are_listed_from_the_window_on_so_older_ones_cannot_crowd_out_new_ones(s3_server,
                                                                                                  monkeypatch):
    """Flushes (shared.lake's layout since cloud_ingest gathers batches) hold many devices' samples under one
    flush=<replica>/ folder, never taken for a device. Their ids sort by time, so the folder is listed from the
    window's start: with a cap of 5 keys, 20 flushes made before the window do not hide the 2 made within it."""
    monkeypatch.setattr(drift_charts, "MAX_KEYS_PER_DEVICE", 5)
    client = s3.client(s3_server.settings())
    client.create_bucket(Bucket=BUCKET)
    now = time.time()
    for seq in range(1, 21):  # made half an hour ago: before the window (and its slack)
        _flush(client, now - 1800 + seq, seq, ("dev-a",))
    _flush(client, now - 60, 21, ("dev-a", "dev-b"))
    _flush(client, now - 30, 22, ("dev-b",))
    snapshot = drift_charts.DriftCharts(client, BUCKET, window_s=300).refresh(now=now)
    assert {d.device: len(d.at) for d in snapshot.devices} == {"dev-a": 1, "dev-b": 2}
    assert not snapshot.truncated


def test_a_replica_with_more_flushes_in_the_window_than_its_cap_shows_its_newest(s3_server, monkeypatch):
    monkeypatch.setattr(drift_charts, "MAX_KEYS_PER_DEVICE", 5)
    client = s3.client(s3_server.settings())
    client.create_bucket(Bucket=BUCKET)
    now = time.time()
    for seq in range(1, 13):  # 12 flushes within the window, one every 10 s, up to now
        _flush(client, now - 120 + 10 * seq, seq, ("dev-a",))
    snapshot = drift_charts.DriftCharts(client, BUCKET, window_s=300).refresh(now=now + 1)
    [series] = snapshot.devices
    assert series.at == [now - 120 + 10 * seq for seq in range(8, 13)], "the newest 5, not the oldest"
    assert snapshot.truncated


def test_a_replica_whose_clock_is_far_behind_still_has_its_flushes_charted(s3_server):
    client = s3.client(s3_server.settings())
    client.create_bucket(Bucket=BUCKET)
    now = time.time()
    # The replica's clock is 1,000 s behind: its flush ids say a time long before the window; S3 stored it now.
    _flush(client, now - 1000, 1, ("dev-a",), at=now - 5)
    [series] = drift_charts.DriftCharts(client, BUCKET, window_s=300).refresh(now=now).devices
    assert series.device == "dev-a" and series.at == [now - 5]


def test_one_devices_large_batch_in_a_flush_does_not_blank_the_other_devices_samples(s3_server, monkeypatch):
    # Caps scaled down: the large batch inflates past the cap a whole object is read under.
    monkeypatch.setattr(drift_charts, "MAX_INFLATED_BYTES", 64 << 10)
    monkeypatch.setattr(drift_charts, "MAX_POINTS", 50)
    client = s3.client(s3_server.settings())
    client.create_bucket(Bucket=BUCKET)
    now = time.time()
    _flush(client, now - 10, 1, ("big",), samples=400, at=now - 10)  # a flush of its own, over the cap too
    _flush(client, now - 5, 2, ("big", "small"), samples=1, at=now - 5)
    # One flush object holds "big"'s 400 samples (> 64 KiB inflated) and then "late"'s one.
    from services.cloud_ingest.flush import Flush, Pending
    from services.cloud_ingest.writer import write_flush
    from shared.schemas import TelemetryBatch

    mixed = Flush(opened=time.monotonic(), flush_id=lake.flush_id(now - 2, "0000beef"))
    for device, count in (("big", 400), ("late", 1)):
        batch = TelemetryBatch(device=device, epoch="0a0b0c0d", sent_at=now, records=[TelemetryRecord(
            seq=10 + i, body=DriftSample(device=device, model=MODEL, scores={AlertType.PREDICTION_DRIFT: 0.2},
                                         samples=10, at=now - 400 + i)) for i in range(count)])
        mixed.batches[(device, batch.batch_id)] = Pending.of(batch, None)
    write_flush(client, BUCKET, "ingest-1", mixed)
    snapshot = drift_charts.DriftCharts(client, BUCKET, window_s=3600).refresh(now=now)
    charted = {d.device: len(d.at) for d in snapshot.devices}
    assert charted == {"big": 50, "small": 1, "late": 1}, charted
