"""The simulator's pure logic: which links are cut, the predictions drawn for the canary, how long a
simulated model has served, the stats file, the registry counter on a real (failing) call, the link's
bounded queue, the bridge settings defined once, the state bytes."""

from __future__ import annotations

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError

from edgefleet import brokerconf
from edgefleet.certs import issue, new_ca
from edgefleet.simulate import link as link_module
from edgefleet.simulate.fleet import cut_devices
from edgefleet.simulate.link import DeviceLink, Endpoint, LinkCounters
from edgefleet.simulate.predictions import Draw, PhotoPrediction, Recording
from edgefleet.simulate.process import state_bytes
from edgefleet.simulate.registry_counter import RegistryCounter
from edgefleet.simulate.stats import SimStats, read, write
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


def test_the_registry_counter_counts_every_attempt_the_failed_ones_by_kind_and_the_bytes_read():
    # A real call to a port nobody listens on: botocore sends, gets no answer, raises.
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
                          endpoint_url="http://127.0.0.1:9",
                          config=Config(retries={"mode": "standard", "total_max_attempts": 2}))
    counter = RegistryCounter(client)
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket="b", Key="k")
    counter.downloaded(1000)  # RegistryIo's callback: the bytes a download step really read
    stats = counter.stats()
    assert stats.requests == {"GetObject": 2}  # botocore's retry is a second sending
    assert stats.errors == {"EndpointConnectionError": 1}
    assert stats.bytes == 1000


@pytest.fixture
def certs(tmp_path):
    new_ca(tmp_path)
    issue(tmp_path, "sim-00000")
    return tmp_path


def test_a_down_link_queues_publishes_up_to_the_bridge_queue_and_refuses_the_rest(certs, monkeypatch):
    monkeypatch.setattr(link_module, "_QUEUE_LIMIT", [3])
    counters = LinkCounters()
    with ThreadPoolExecutor(1) as pool:
        link = DeviceLink("sim-00000", Endpoint("127.0.0.1", 9, certs), pool, counters)
        for i in range(5):  # never started: down, as a link is before its first CONNACK
            link.publish("edgefleet/sim-00000/status/sync", f"{i}".encode(), retain=True)
    assert (link.queued(), link.pending(), counters.refused) == (3, 3, 2)
    assert not link.connected.is_set() and link.settled  # nothing could go out now


def test_the_link_queue_is_the_bridge_queue_edge_conf_sets():
    assert link_module.queue_limit() == brokerconf.bridge_queue_limit() == 10000
    rendered = brokerconf.bridge("sim-00000", "fleet", 8883, brokerconf.DEPLOY)
    assert "restart_timeout 1 10\n" in rendered
    for topic, direction, qos in brokerconf.bridge_topics("sim-00000"):
        assert f"topic {topic} {direction} {qos}\n" in rendered


def test_state_bytes_count_a_hard_linked_file_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "a" / "model", tmp_path / "fallback")
    (tmp_path / "outbox.db").write_bytes(b"y" * 10_000)
    assert 110_000 <= state_bytes(tmp_path) < 110_000 + 3 * 8192
    assert state_bytes(tmp_path / "missing") == 0


def test_the_link_publishes_from_any_thread_through_the_loop(certs):
    async def main() -> int:
        with ThreadPoolExecutor(1) as pool:
            link = DeviceLink("sim-00000", Endpoint("127.0.0.1", 9, certs), pool, LinkCounters())
            link.start(delay_s=3600)  # never connects during the test
            await asyncio.get_running_loop().run_in_executor(None, lambda: link.publish("t", b"x"))
            await asyncio.sleep(0)  # the loop runs the handed-over publish
            link.disconnect()
            return link.queued()
    assert asyncio.run(main()) == 1


def test_reconnect_delays_stay_within_the_bridges_restart_timeout():
    link = DeviceLink.__new__(DeviceLink)  # the backoff alone: no certificate, no socket
    link._delay = 0.0
    delays = [link._backoff() for _ in range(50)]
    base, cap = brokerconf.BRIDGE_RESTART_S
    assert all(base <= d <= cap for d in delays)
    assert max(delays) > base * 2  # it backs off
