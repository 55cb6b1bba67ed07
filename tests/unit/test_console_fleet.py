"""The fleet console's pure logic: the fleet's state from retained messages (services/console/fleet.py)
and the charts from S3 telemetry objects (services/console/charts.py), fed real wire payloads."""

from __future__ import annotations

import gzip
import threading

import pytest

from services.console import charts as drift_charts
from services.console.fleet import MAX_PLUGINS, MAX_ROLLBACKS, FleetState
from services.console.server import page_files
from shared import codec, lake, schemas, topics
from shared.codec import WireFormat, encode
from shared.schemas import (
    AlertType,
    CanaryVerdict,
    DriftSample,
    InferenceStats,
    ModelRef,
    ServiceState,
    ServiceStatus,
    SyncReport,
    SyncState,
    TelemetryRecord,
    TelemetryStats,
)

NOW = 1_800_000_000.0
V1 = ModelRef(name="efficientnet-lite0", version=1, sha256="a" * 64)
V2 = ModelRef(name="efficientnet-lite0", version=2, sha256="b" * 64)


def status(device: str, service: str, at: float, state=ServiceState.ONLINE, **fields) -> ServiceStatus:
    return ServiceStatus(device=device, service=service, state=state, at=at, edgefleet_version="0.1.0", **fields)


def feed_status(fleet: FleetState, s: ServiceStatus, fmt=WireFormat.JSON) -> None:
    fleet.on_status(topics.status(s.device, s.service), encode(s, fmt), fmt.content_type)


def feed_report(fleet: FleetState, r: SyncReport) -> None:
    fleet.on_sync_state(topics.sync_state(r.device), encode(r), WireFormat.JSON.content_type)


def inference(device: str, at: float, published: int, model: ModelRef = V1) -> ServiceStatus:
    return status(device, "inference", at, model=model, inference=InferenceStats(predictions_published=published))


def telemetry(device: str, at: float, queue: int, alerts: list[str]) -> ServiceStatus:
    stats = TelemetryStats(queue_records=queue, queue_bytes=queue * 100, next_seq=queue + 1, dropped={},
                           batches_sent=0, batches_resent=0, records_acknowledged=0, open_alerts=alerts)
    return status(device, "telemetry", at, telemetry=stats)


def rollout(rollout_id: str = "r-2", phase=schemas.RolloutPhase.CANARY, **target) -> schemas.Rollout:
    return schemas.Rollout(rollout_id=rollout_id, model="efficientnet-lite0", version=2, phase=phase,
                           target=schemas.RolloutTarget(**target), issued_at=NOW - 30)


def device_view(fleet: FleetState, device: str, now: float = NOW):
    return next(d for d in fleet.snapshot(now).devices if d.device == device)


def test_every_device_shows_its_model_sync_state_outbox_and_open_alerts_keyed_by_topic():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW - 1, 10))
    feed_status(fleet, telemetry("dev-a", NOW - 1, 42, ["confidence_drift"]))
    feed_report(fleet, SyncReport(device="dev-a", rollout_id="r-1", state=SyncState.FAILED, reason="NoSuchKey",
                                  serving=V1, at=NOW - 2))
    # The payload claims another device: the topic (tied to the certificate by the ACL) decides.
    claim = status("dev-a", "sync", NOW - 1)
    fleet.on_status(topics.status("dev-b", "sync"), encode(claim), WireFormat.JSON.content_type)
    snapshot = fleet.snapshot(NOW)
    assert [d.device for d in snapshot.devices] == ["dev-a", "dev-b"]
    a = snapshot.devices[0]
    assert (a.health, a.model, a.sync_state, a.sync_reason, a.sync_rollout) == (
        "online", "efficientnet-lite0 v1", "failed", "NoSuchKey", "r-1")
    assert (a.outbox_records, a.open_alerts) == (42, ["confidence_drift"])
    assert a.services == {"inference": "online", "telemetry": "online"}


def test_msgpack_statuses_are_read_like_json():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, telemetry("dev-a", NOW, 7, []), WireFormat.MSGPACK)
    assert device_view(fleet, "dev-a").outbox_records == 7


def test_predictions_per_second_come_from_two_inference_statuses_counters():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW - 10, 100))
    assert device_view(fleet, "dev-a").predictions_per_s is None  # one status: no rate yet
    feed_status(fleet, inference("dev-a", NOW - 5, 140))
    assert device_view(fleet, "dev-a").predictions_per_s == 8.0
    feed_status(fleet, inference("dev-a", NOW, 3))  # restarted: its counter went back
    assert device_view(fleet, "dev-a").predictions_per_s is None
    feed_status(fleet, inference("dev-a", NOW + 2, 13))
    assert device_view(fleet, "dev-a", NOW + 2).predictions_per_s == 5.0


def test_a_device_turns_stale_when_its_newest_status_is_older_than_stale_after():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW - 30, 100))
    feed_status(fleet, status("dev-a", "sync", NOW - 19))
    fresh = device_view(fleet, "dev-a")
    assert (fresh.health, fresh.health_reason, fresh.age_s) == ("online", None, 19.0)
    stale = device_view(fleet, "dev-a", NOW + 2)
    assert (stale.health, stale.health_reason) == ("stale", "no status for 21 s")
    assert stale.predictions_per_s is None  # a rate nobody vouches for any more is not shown


def test_a_device_clock_ahead_of_the_console_is_not_stale():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, status("dev-a", "sync", NOW + 300))
    view = device_view(fleet, "dev-a")
    assert (view.health, view.age_s) == ("online", 0.0)


def test_a_service_last_will_makes_its_device_stale_at_once():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW - 1, 100))
    feed_status(fleet, status("dev-a", "sync", NOW - 1))
    will = status("dev-a", "inference", NOW - 60, state=ServiceState.OFFLINE, reason="connection lost")
    feed_status(fleet, will)
    view = device_view(fleet, "dev-a")
    assert (view.health, view.health_reason) == ("stale", "inference offline (connection lost)")
    assert view.services == {"inference": "offline", "sync": "online"}


def test_cloud_ingest_replicas_statuses_are_not_devices():
    fleet = FleetState(stale_after_s=20)
    replica = status("cloud-ingest-0", topics.INGEST_SERVICE, NOW)
    fleet.on_status(topics.status("cloud-ingest-0", topics.INGEST_SERVICE), encode(replica))
    assert fleet.snapshot(NOW).devices == []


@pytest.mark.parametrize("reserved", ["console", "operator", "cloud-ingest-0", "cloud-broker"])
def test_statuses_and_sync_states_on_a_reserved_ids_topics_are_refused(reserved):
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference(reserved, NOW, 5))
    feed_status(fleet, status(reserved, topics.SYNC_SERVICE, NOW))
    feed_report(fleet, SyncReport(device=reserved, rollout_id="r-2", state=SyncState.ROLLED_BACK, at=NOW))
    plugin_state = SyncReport(device=reserved, rollout_id="p-1", state=SyncState.ACTIVE, at=NOW)
    fleet.on_plugin_sync_state(topics.plugin_sync_state(reserved, "night_alert"), encode(plugin_state))
    fleet.on_plugin_rollout(topics.plugin_rollout("night_alert"), encode(schemas.PluginRollout(
        rollout_id="p-1", plugin="night_alert", version=1, phase=schemas.RolloutPhase.PROMOTED,
        target=schemas.RolloutTarget(), issued_at=NOW)))
    snapshot = fleet.snapshot(NOW)
    assert snapshot.devices == [] and snapshot.rollbacks == []
    assert snapshot.plugin_rollouts[0].devices == {}
    assert fleet.refused == 4


def test_only_the_device_services_statuses_are_kept():
    fleet = FleetState(stale_after_s=20)
    for service in (*topics.DEVICE_SERVICES, "camera", "x" * 60):
        feed_status(fleet, status("dev-a", service, NOW))
    assert device_view(fleet, "dev-a").services == {s: "online" for s in sorted(topics.DEVICE_SERVICES)}
    assert fleet.refused == 2


def test_a_canary_names_its_devices_out_of_the_target_until_promoted():
    fleet = FleetState(stale_after_s=20)
    for device in ("device-1", "device-2"):
        feed_status(fleet, inference(device, NOW, 1))
    fleet.on_rollout(topics.rollout(), encode(rollout(share=0.5, canary_devices=["device-1"])))
    view = fleet.snapshot(NOW).rollout
    assert view is not None and view.canary_devices == ["device-1"]
    assert view.canary == "device-1 (1 of 2 devices)"
    listed = rollout(devices=["device-1", "device-2", "device-3"], share=0.3, canary_devices=["device-2"])
    fleet.on_rollout(topics.rollout(), encode(listed))
    assert fleet.snapshot(NOW).rollout.canary == "device-2 (1 of 3 devices)"
    fleet.on_rollout(topics.rollout(), encode(rollout(groups=["yard"], share=0.5, canary_devices=["device-1"])))
    assert fleet.snapshot(NOW).rollout.canary == "device-1 (1 device)"
    promoted = rollout(phase=schemas.RolloutPhase.PROMOTED, share=0.5, canary_devices=["device-1"])
    fleet.on_rollout(topics.rollout(), encode(promoted))
    assert fleet.snapshot(NOW).rollout.canary is None
    fleet.on_rollout(topics.rollout(), encode(rollout(share=0.5)))  # an older rollout: the share decides
    assert fleet.snapshot(NOW).rollout.canary is None


def test_the_rollout_shows_its_target_and_devices_per_state_of_this_rollout_only():
    fleet = FleetState(stale_after_s=20)
    fleet.on_rollout(topics.rollout(), encode(rollout(devices=["dev-a", "dev-b"], share=0.5)))
    feed_report(fleet, SyncReport(device="dev-a", rollout_id="r-2", state=SyncState.ACTIVE, serving=V2, at=NOW))
    feed_report(fleet, SyncReport(device="dev-b", rollout_id="r-2", state=SyncState.NOT_TARGETED, at=NOW))
    feed_report(fleet, SyncReport(device="dev-c", rollout_id="r-1", state=SyncState.ACTIVE, at=NOW))
    view = fleet.snapshot(NOW).rollout
    assert view is not None
    assert (view.rollout_id, view.name, view.version, view.phase, view.share) == (
        "r-2", "efficientnet-lite0", 2, "canary", 0.5)
    assert view.target_devices == ["dev-a", "dev-b"]
    assert view.states == {"active": 1, "not_targeted": 1}
    assert view.devices == {"dev-a": "active", "dev-b": "not_targeted"}
    fleet.on_rollout(topics.rollout(), b"")  # an operator cleared the retained rollout
    assert fleet.snapshot(NOW).rollout is None


def test_a_rollback_is_kept_with_its_canary_verdict_after_the_device_moves_on():
    fleet = FleetState(stale_after_s=20)
    verdict = CanaryVerdict(samples_before=50, samples_after=50, error_rate_before=0, error_rate_after=0,
                            latency_p95_before_ms=10, latency_p95_after_ms=12, mean_confidence_before=0.8,
                            mean_confidence_after=0.3, prediction_psi=1.2, passed=False,
                            reasons=["prediction PSI 1.20 > 0.50", "mean confidence fell by 0.50"])
    feed_report(fleet, SyncReport(device="dev-a", rollout_id="r-2", state=SyncState.ROLLED_BACK, target=V2,
                                  serving=V1, reason="canary failed", canary=verdict, at=NOW))
    feed_report(fleet, SyncReport(device="dev-a", rollout_id="r-3", state=SyncState.DOWNLOADING, at=NOW + 5))
    [rollback] = fleet.snapshot(NOW + 5).rollbacks
    assert (rollback.device, rollback.rollout_id, rollback.target, rollback.serving) == (
        "dev-a", "r-2", "efficientnet-lite0 v2", "efficientnet-lite0 v1")
    assert (rollback.canary_passed, rollback.canary_conclusive) == (False, True)
    assert rollback.canary_reasons == verdict.reasons


def test_rollbacks_are_bounded_newest_first():
    fleet = FleetState(stale_after_s=20)
    for i in range(MAX_ROLLBACKS + 5):
        feed_report(fleet, SyncReport(device=f"dev-{i}", rollout_id="r-2", state=SyncState.ROLLED_BACK, at=NOW + i))
    rollbacks = fleet.snapshot(NOW).rollbacks
    assert len(rollbacks) == MAX_ROLLBACKS
    assert rollbacks[0].device == f"dev-{MAX_ROLLBACKS + 4}" and rollbacks[-1].device == "dev-5"


def test_plugin_rollouts_show_beside_the_model_rollout():
    fleet = FleetState(stale_after_s=20)
    plugin = schemas.PluginRollout(rollout_id="p-1", plugin="night_alert", version=3,
                                   phase=schemas.RolloutPhase.PROMOTED, target=schemas.RolloutTarget(groups=["yard"]),
                                   issued_at=NOW)
    fleet.on_plugin_rollout(topics.plugin_rollout("night_alert"), encode(plugin))
    report = SyncReport(device="dev-a", rollout_id="p-1", state=SyncState.ACTIVE, at=NOW)
    fleet.on_plugin_sync_state(topics.plugin_sync_state("dev-a", "night_alert"), encode(report))
    [view] = fleet.snapshot(NOW).plugin_rollouts
    assert (view.kind, view.name, view.version, view.target_groups, view.states) == (
        "plugin", "night_alert", 3, ["yard"], {"active": 1})
    assert fleet.snapshot(NOW).rollout is None


def test_plugin_names_a_device_invents_cannot_hide_a_plugin_the_operators_roll_out():
    fleet = FleetState(stale_after_s=20)
    invented = SyncReport(device="dev-evil", rollout_id="x", state=SyncState.ACTIVE, at=NOW)
    for n in range(MAX_PLUGINS + 5):  # one device's certificate, as many names as it likes
        fleet.on_plugin_sync_state(topics.plugin_sync_state("dev-evil", f"fake-{n}"), encode(invented))
    plugin = schemas.PluginRollout(rollout_id="p-1", plugin="night_alert", version=3,
                                   phase=schemas.RolloutPhase.PROMOTED, target=schemas.RolloutTarget(), issued_at=NOW)
    fleet.on_plugin_rollout(topics.plugin_rollout("night_alert"), encode(plugin))
    report = SyncReport(device="dev-a", rollout_id="p-1", state=SyncState.ACTIVE, at=NOW)
    fleet.on_plugin_sync_state(topics.plugin_sync_state("dev-a", "night_alert"), encode(report))

    [view] = fleet.snapshot(NOW).plugin_rollouts
    assert (view.name, view.states) == ("night_alert", {"active": 1})
    # Still bounded: the real plugin took an invented name's place, and a further invented one gets none.
    fleet.on_plugin_sync_state(topics.plugin_sync_state("dev-evil", "fake-new"), encode(invented))
    assert len(fleet._plugin_reports) == MAX_PLUGINS and "fake-new" not in fleet._plugin_reports


@pytest.mark.parametrize("payload", [b"{not json", b'{"device": "dev-a"}', b"\x81\xa1x\x01"])
def test_an_unreadable_payload_is_counted_and_changes_nothing(payload):
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW, 100))
    before = fleet.snapshot(NOW)
    fleet.on_status(topics.status("dev-a", "inference"), payload)
    fleet.on_rollout(topics.rollout(), payload)
    assert fleet.undecodable == 2
    assert fleet.snapshot(NOW) == before


def test_an_empty_retained_status_clears_that_service():
    fleet = FleetState(stale_after_s=20)
    feed_status(fleet, inference("dev-a", NOW, 100))
    feed_status(fleet, status("dev-a", "sync", NOW))
    fleet.on_status(topics.status("dev-a", "inference"), b"")
    assert device_view(fleet, "dev-a").services == {"sync": "online"}


def test_a_change_wakes_the_event_streams_waiting_for_one():
    fleet = FleetState(stale_after_s=20)
    seen = fleet.wait_change(-1, 0)
    assert fleet.wait_change(seen, 0.05) == seen  # nothing changed: the wait times out
    threading.Timer(0.05, feed_status, (fleet, status("dev-a", "sync", NOW))).start()
    assert fleet.wait_change(seen, 10) > seen


# -- charts ----------------------------------------------------------------------------------------------


def drift(device: str, at: float, psi: float, p95: float | None = 12.0) -> DriftSample:
    return DriftSample(device=device, model=V1, scores={AlertType.PREDICTION_DRIFT: psi, AlertType.LATENCY: 1.1},
                       samples=100, latency_p50_ms=8.0, latency_p95_ms=p95, at=at)


def lines(*samples, seq: int = 1) -> bytes:
    return "\n".join(TelemetryRecord(seq=seq + i, body=s).model_dump_json() for i, s in enumerate(samples)).encode()


def test_an_objects_drift_samples_are_read_and_foreign_lines_skipped():
    other_kind = TelemetryRecord(seq=9, body=drift("dev-b", NOW, 0.1)).model_dump_json()
    text = lines(drift("dev-a", NOW, 0.1), drift("dev-a", NOW + 5, 0.2)) + b"\n" + other_kind.encode() + b"\n{bad\n"
    samples, skipped = drift_charts.samples_of(codec.inflate(gzip.compress(text), 1 << 20, gzip=True), "dev-a")
    assert [s.scores[AlertType.PREDICTION_DRIFT] for s in samples] == [0.1, 0.2]
    assert skipped == 2  # the line naming another device than its key, and the broken one


def test_inflating_a_gzip_object_stops_at_the_cap_before_the_whole_object():
    bomb = gzip.compress(b"\0" * (4 << 20))
    with pytest.raises(ValueError, match="inflates past"):
        codec.inflate(bomb, 1 << 20, gzip=True)
    with pytest.raises(ValueError, match="not valid compressed"):
        codec.inflate(b"plain text", 1 << 20, gzip=True)


def test_charts_keep_the_window_in_time_order_and_the_newest_points():
    old = drift_charts._Read("e1", (drift("dev-a", NOW - 7200, 0.9), drift("dev-a", NOW - 20, 0.3)))
    new = drift_charts._Read("e2", (drift("dev-a", NOW - 10, 0.4, p95=None), drift("dev-a", NOW - 20, 0.3)))
    [series] = drift_charts.charts({"k1": old, "k2": new}, NOW, 3600)
    assert series.at == [NOW - 20, NOW - 10]  # the sample out of the window left out, the repeated one once
    assert series.scores == {"prediction_drift": [0.3, 0.4], "latency": [1.1, 1.1]}
    assert series.latency_p95_ms == [12.0, None]
    many = drift_charts._Read("e3", tuple(drift("dev-b", NOW - i, 0.1) for i in range(drift_charts.MAX_POINTS + 50)))
    [capped] = drift_charts.charts({"k3": many}, NOW, 3600)
    assert len(capped.at) == drift_charts.MAX_POINTS and capped.at[-1] == NOW


def test_the_days_listed_are_those_the_window_reaches_and_bounded():
    day = 86400
    midnight = (NOW // day) * day
    assert [lake.records_prefix("drift", t) for t in drift_charts.days(midnight + 3600, 1800)] == [
        lake.records_prefix("drift", midnight)]
    assert len(drift_charts.days(midnight + 3600, 7200)) == 2  # the window reaches back into yesterday
    assert len(drift_charts.days(NOW, 400 * day)) == drift_charts.MAX_DAYS


def test_the_records_key_names_its_device():
    key = lake.records_key("drift", NOW, "dev-a", "0badc0de-000000000001-000000000009")
    assert key.startswith(lake.records_prefix("drift", NOW))
    assert lake.device_of_key(key) == "dev-a"
    assert lake.device_of_key("telemetry/_store.json") is None


def test_the_page_ships_with_the_package():
    files = page_files()
    assert b'id="devices"' in files["index.html"] and b"EventSource" in files["console.js"]


def test_reads_go_newest_first_device_by_device_so_a_busy_device_cannot_starve_a_quiet_one():
    new = {f"busy-{i}": ("busy", NOW - i) for i in range(5)}
    new["quiet-old"] = ("quiet", NOW - 3000)
    new["quiet-new"] = ("quiet", NOW - 100)
    order = drift_charts.read_order(new)
    assert order[:2] == ["busy-0", "quiet-new"]  # each device's newest before anyone's second newest
    assert order[2:4] == ["busy-1", "quiet-old"]
    assert order[4:] == ["busy-2", "busy-3", "busy-4"]
