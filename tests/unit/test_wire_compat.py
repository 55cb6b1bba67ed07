"""Wire compatibility within WIRE_VERSION 1: a receiver not yet upgraded (its schemas frozen in
tests/unit/wire_v1.py, as released at 506afb5) accepts what an upgraded sender sends whenever the fields
added since hold their defaults; they are then left out of the encoding, in JSON and in msgpack alike."""

from __future__ import annotations

import pytest

from shared.codec import DecodeError, WireFormat, decode, encode
from shared.schemas import (
    AckRange,
    ResourceSample,
    Rollout,
    RolloutPhase,
    RolloutTarget,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
)
from tests.unit import wire_v1

FORMATS = [WireFormat.JSON, WireFormat.MSGPACK, WireFormat.MSGPACK_ZLIB]
STORE = "0123456789abcdef0123456789abcdef"


def _rollout(target: RolloutTarget) -> Rollout:
    return Rollout(rollout_id="r-1", version=2, phase=RolloutPhase.CANARY, target=target, issued_at=1.0,
                   model="efficientnet-lite0")


def _batch(acknowledged: list[AckRange]) -> TelemetryBatch:
    sample = ResourceSample(device="d1", cpu_percent=1.0, memory_percent=2.0, memory_used_bytes=3,
                            disk_percent=4.0, at=5.0)
    return TelemetryBatch(device="d1", epoch="0000abcd", records=[TelemetryRecord(seq=1, body=sample)],
                          sent_at=6.0, acknowledged=acknowledged)


def _ack(store: str | None) -> TelemetryAck:
    return TelemetryAck(device="d1", batch_id="0000abcd-1-1", stored=1, at=7.0, store=store)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_old_device_accepts_a_rollout_that_names_no_canary_devices(fmt):
    payload = encode(_rollout(RolloutTarget(devices=["d1"], share=0.5)), fmt)
    old = decode(wire_v1.Rollout, payload, fmt.content_type)
    assert old.target.devices == ["d1"] and old.target.share == 0.5
    assert decode(Rollout, payload, fmt.content_type).target.canary_devices == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_old_ingest_accepts_a_batch_that_carries_no_acknowledged_ranges(fmt):
    payload = encode(_batch([]), fmt)
    assert decode(wire_v1.TelemetryBatch, payload, fmt.content_type).records[0].seq == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_old_device_accepts_an_ack_that_names_no_store(fmt):
    payload = encode(_ack(None), fmt)
    assert decode(wire_v1.TelemetryAck, payload, fmt.content_type).stored == 1
    assert decode(TelemetryAck, payload, fmt.content_type).store is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_new_fields_round_trip_when_they_say_something(fmt):
    target = RolloutTarget(devices=["d1", "d2"], share=0.5, canary_devices=["d2"])
    assert decode(Rollout, encode(_rollout(target), fmt), fmt.content_type).target.canary_devices == ["d2"]
    ranges = [AckRange(store=STORE, first_seq=1, last_seq=4)]
    assert decode(TelemetryBatch, encode(_batch(ranges), fmt), fmt.content_type).acknowledged == ranges
    assert decode(TelemetryAck, encode(_ack(STORE), fmt), fmt.content_type).store == STORE


def test_an_old_receiver_refuses_a_new_field_that_says_something():
    """What docs/protocol.md says holds: a set field needs an upgraded receiver (the device that is not
    upgraded refuses the rollout that names canaries; it does not half-read it)."""
    target = RolloutTarget(devices=["d1"], canary_devices=["d1"])
    with pytest.raises(DecodeError, match="canary_devices"):
        decode(wire_v1.Rollout, encode(_rollout(target)))
    with pytest.raises(DecodeError, match="store"):
        decode(wire_v1.TelemetryAck, encode(_ack(STORE)))
