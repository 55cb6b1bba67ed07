"""A paced rollout on real processes: a real sync service waits its turn, reported, and a newer rollout
ends that wait at once; `edgefleet rollout start|promote` size the pacing from the devices online on a
real Mosquitto and the artifact in a real S3 registry, and print it before they publish. The pacing's
logic (turns, sizing, wire) is tests/unit/test_pacing.py."""

from __future__ import annotations

import time

from typer.testing import CliRunner

from edgefleet import cli
from edgefleet import fleet_rollout as operator
from edgefleet.fleet_rollout import PACING_SINCE
from services.sync.membership import pacing_position
from shared import VERSION, topics
from shared.codec import WireFormat, encode
from shared.schemas import (
    MAX_SPREAD_S,
    Rollout,
    RolloutPacing,
    RolloutPhase,
    RolloutTarget,
    ServiceState,
    ServiceStatus,
)
from tests.support import Device, client_link, retained, wait_until

NAME = "efficientnet-lite0"
DEVICE = "edge-paced"


def _rollout(rollout_id: str, version: int, pacing: RolloutPacing | None = None) -> Rollout:
    return Rollout(rollout_id=rollout_id, model=NAME, version=version, phase=RolloutPhase.PROMOTED,
                   target=RolloutTarget(), issued_at=time.time(), pacing=pacing)


def test_a_paced_sync_waits_its_turn_and_a_newer_rollout_ends_the_wait(fleet, model_dir):
    device = Device(fleet.broker.url, DEVICE)
    try:
        _paced_then_superseded(fleet, device, fleet.start_sync(DEVICE, model_dir))
    finally:
        device.close()


def _paced_then_superseded(fleet, device: Device, sync) -> None:
    wait_until(lambda: (s := device.latest_status("sync")) is not None and s.state == "online" or not sync.alive(),
               60, "the sync service's online status")
    # A turn far in the future (at least a fifth of an hour): only a newer rollout can end it.
    rollout_id = next(f"paced-{i}" for i in range(100) if pacing_position(f"paced-{i}", DEVICE) > 0.2)
    operator.publish(fleet.settings(), _rollout(rollout_id, 2, RolloutPacing(spread_s=MAX_SPREAD_S, max_concurrent=50)))
    waiting = device.sync_report(lambda r: r.rollout_id == rollout_id and r.state == "received" and r.reason,
                                 "the paced wait, reported")
    assert waiting.reason.startswith("paced: starting the download in ") and "over 3600 s" in waiting.reason

    operator.publish(fleet.settings(), _rollout("unpaced", 3))  # v3 is in no registry: it fails there
    failed = device.sync_report(lambda r: r.rollout_id == "unpaced" and r.state == "failed", "the newer rollout", 60)
    assert "3/manifest.json: NoSuch" in failed.reason  # past its turn at once: it asked the registry
    assert device.sync_states(rollout_id) == ["received"], "the paced rollout never reached the registry"
    assert sync.alive(), sync.log()


def _online(broker_url: str, devices: list[str], version: str = VERSION) -> None:
    link = client_link(broker_url)
    link.start()
    assert link.wait_connected(10)
    for device in devices:
        status = ServiceStatus(device=device, service=topics.SYNC_SERVICE, state=ServiceState.ONLINE,
                               at=time.time(), edgefleet_version=version)
        link.publish(topics.status(device, topics.SYNC_SERVICE), encode(status), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)
    link.stop()


def test_start_and_promote_pace_only_what_exceeds_the_concurrency_and_say_so_first(fleet, model_dir):
    size = fleet.publish(model_dir).size_bytes
    _online(fleet.broker.url, [f"device-{i}" for i in range(4)])
    env = {**fleet.s3_server.env(), "EDGEFLEET_MQTT_URL": fleet.broker.url,
           "EDGEFLEET_TRUSTED_KEYS_DIR": str(fleet.keys.public.parent)}
    runner = CliRunner()

    started = runner.invoke(cli.app, ["rollout", "start", NAME, "1", "--canary-devices", "1",
                                      "--max-concurrent-downloads", "1", "--rollout-id", "paced"], env=env)
    assert started.exit_code == 0, started.output
    assert "pacing: none (1 devices to download, at most 1 at once)" in started.stderr
    assert retained(fleet.broker.url, topics.rollout(), Rollout).pacing is None  # a canary of one: not paced

    promote = ["rollout", "promote", "--max-concurrent-downloads", "1", "--device-download-bytes-s", "1000000"]
    canary = retained(fleet.broker.url, topics.rollout(), Rollout).target.canary_devices
    not_in_canary = [d for d in (f"device-{i}" for i in range(4)) if d not in canary]
    _online(fleet.broker.url, not_in_canary[:1], "0.0.9")  # a device from before the pacing field
    unpaced = runner.invoke(cli.app, promote, env=env)
    assert unpaced.exit_code == 0, unpaced.output
    assert f"pacing: none (1 of the 3 devices run edgefleet older than {PACING_SINCE}" in unpaced.stderr
    assert retained(fleet.broker.url, topics.rollout(), Rollout).pacing is None, "it would refuse a paced one"

    _online(fleet.broker.url, not_in_canary[:1])  # upgraded
    promoted = runner.invoke(cli.app, promote, env=env)
    assert promoted.exit_code == 0, promoted.output
    rollout = retained(fleet.broker.url, topics.rollout(), Rollout)
    spread = 3 * max(1.0, size / 1_000_000)  # the three devices not in the canary, one at a time
    assert rollout.phase is RolloutPhase.PROMOTED
    assert rollout.pacing == RolloutPacing(spread_s=round(spread, 3), max_concurrent=1)
    assert f"pacing: 3 devices' downloads spread over {spread:.0f} s" in promoted.stderr
    assert promoted.stderr.index("pacing:") < promoted.stderr.index("rollout paced: promoted")

    assert runner.invoke(cli.app, ["rollout", "abort"], env=env).exit_code == 0
    assert retained(fleet.broker.url, topics.rollout(), Rollout).pacing is None, "an abort acts at once everywhere"
