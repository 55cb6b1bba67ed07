"""The simulator's pure logic: which links are cut, the predictions drawn for the canary, how long a
simulated model has served, the stats file, and the registry counter's hooks."""

from __future__ import annotations

import math

import boto3
from botocore.config import Config

from edgefleet.simulate.fleet import cut_devices
from edgefleet.simulate.link import RECONNECT_BASE_S, RECONNECT_CAP_S, DeviceLink
from edgefleet.simulate.predictions import Draw, PhotoPrediction, Recording
from edgefleet.simulate.stats import RegistryCounter, SimStats, read, write
from edgefleet.simulate.sync_io import SimInference
from services.sync import canary
from shared.config import CanarySettings
from shared.schemas import ModelRef

RECORDING = Recording(model="m", version=1, sha256="a" * 64, predictions=[
    PhotoPrediction(photo=f"p{i}", label=f"label-{i % 3}", confidence=0.1 * (i + 1), latencies_ms=[i + 1.0, i + 2.0])
    for i in range(5)
])


def test_a_cut_takes_the_share_rounded_up_and_the_same_devices_whatever_the_order():
    devices = [f"sim-{i:05d}" for i in range(1000)]
    chosen = cut_devices(devices, 0.1)
    assert len(chosen) == 100
    assert chosen == cut_devices(list(reversed(devices)), 0.1)
    assert set(chosen) <= set(devices)
    assert len(cut_devices(devices[:7], 0.1)) == math.ceil(0.7)
    assert cut_devices(devices, 0) == []
    # A smaller share is a subset: the hash ranks devices once, whatever the share.
    assert set(cut_devices(devices, 0.05)) <= set(chosen)


def test_the_canary_counts_predictions_after_the_warmup_at_the_rate():
    draw = Draw(RECORDING, per_s=10, warmup=5, offset=0)
    assert draw.count(0.4) == 0  # 4 predictions, all in the warmup
    assert draw.count(2.0) == 15
    assert draw.seconds_for(15) == 2.0
    assert Draw(RECORDING, per_s=0, warmup=0, offset=0).seconds_for(1) == math.inf


def test_a_window_is_drawn_from_the_recording_in_camera_order():
    draw = Draw(RECORDING, per_s=10, warmup=2, offset=1)
    window = draw.window(size=4, serving_s=1.0)  # 10 made: the last 4 (numbers 6..9)
    rows = RECORDING.predictions
    assert isinstance(window, canary.Window)
    assert list(window.labels) == [rows[(1 + i) % 5].label for i in range(6, 10)]
    assert list(window.confidences) == [rows[(1 + i) % 5].confidence for i in range(6, 10)]
    assert list(window.latencies) == [rows[(1 + i) % 5].latencies_ms[(i // 5) % 2] for i in range(6, 10)]
    assert window.error_rate == 0
    assert len(draw.window(size=50, serving_s=0.5)) == 3  # 5 made, 2 of them the warmup


def test_the_same_recording_on_both_sides_of_a_switch_passes_the_real_canary():
    limits = CanarySettings(window=20, min_samples=10)
    before = Draw(RECORDING, per_s=20, warmup=0, offset=0).window(20, 5.0)
    after = Draw(RECORDING, per_s=20, warmup=0, offset=3).window(20, 5.0)
    assert canary.judge(before, after, limits).passed


def test_serving_time_is_kept_per_model_across_switches():
    old, new = ModelRef(name="m", version=1, sha256="1" * 64), ModelRef(name="m", version=2, sha256="2" * 64)
    inference = SimInference(old, Draw(RECORDING, 10, 0, 0))
    inference._since -= 3.0  # it has served for three seconds
    inference.serve(new)
    assert inference.model == new
    assert 3.0 <= inference.serving_s(old.sha256) < 3.5
    assert inference.serving_s(new.sha256) < 0.5
    assert inference.serving_s("3" * 64) == 0.0


def test_the_stats_file_reads_back_what_was_written(tmp_path):
    stats = SimStats(pid=1, at=2.0, devices=3, connected=2, rss_bytes=10, rss_before_devices_bytes=4,
                     per_device_bytes=2)
    write(tmp_path / "stats.json", stats)
    assert read(tmp_path / "stats.json") == stats
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_registry_counter_counts_operations_and_body_bytes():
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
                          endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}))
    counter = RegistryCounter(client)
    model = client.meta.service_model
    client.meta.events.emit("after-call.s3.GetObject", model=model.operation_model("GetObject"),
                            parsed={"ContentLength": 1000}, http_response=None, context={})
    client.meta.events.emit("after-call.s3.HeadObject", model=model.operation_model("HeadObject"),
                            parsed={"ContentLength": 5000}, http_response=None, context={})
    stats = counter.stats()
    assert stats.requests == {"GetObject": 1, "HeadObject": 1}
    assert stats.bytes == 1000  # a HEAD transfers no body


def test_reconnect_delays_stay_within_the_bridges_restart_timeout():
    link = DeviceLink.__new__(DeviceLink)  # the backoff alone: no certificate, no socket
    link._delay = 0.0
    delays = [link._backoff() for _ in range(50)]
    assert all(RECONNECT_BASE_S <= d <= RECONNECT_CAP_S for d in delays)
    assert max(delays) > RECONNECT_BASE_S * 2  # it backs off
