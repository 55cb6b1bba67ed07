"""The wire format: schemas, codec, topics, frame intake (pure logic)."""

from __future__ import annotations

import msgpack
import pytest

from edgefleet import photos
from services.inference.decode import jpeg_size
from services.inference.intake import FrameRejected, Intake
from shared import topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.schemas import Encoding, ErrorReason, FrameEnvelope


def test_envelope_round_trips_in_msgpack():
    envelope = FrameEnvelope(frame_id="f-1", encoding=Encoding.JPEG, data=b"\xff\xd8\xff", captured_at=1.5)
    assert decode(FrameEnvelope, encode(envelope, WireFormat.MSGPACK)) == envelope


@pytest.mark.parametrize(
    "obj",
    [
        {"frame_id": 7, "encoding": "jpeg", "data": b"x"},  # a number is not an id
        {"frame_id": "a", "encoding": "gif", "data": b"x"},
        {"frame_id": "a", "encoding": "jpeg", "data": "text"},  # text is not bytes
        {"frame_id": "a", "encoding": "jpeg", "data": b"x", "extra": 1},
        {"frame_id": "a", "encoding": "jpeg"},
        [1, 2, 3],
    ],
)
def test_wrong_envelopes_are_refused_with_a_reason(obj):
    with pytest.raises(DecodeError):
        decode(FrameEnvelope, msgpack.packb(obj, use_bin_type=True))


def test_intake_tells_raw_images_from_envelopes_and_checks_size():
    intake = Intake(max_frame_bytes=250_000)
    raw = intake.parse("cam", photos.jpeg("chelsea"), None)
    assert raw.frame_id.startswith("cam-") and raw.data == photos.jpeg("chelsea")
    assert intake.parse("cam", photos.png("coins"), None).data.startswith(b"\x89PNG")
    env = FrameEnvelope(frame_id="x-9", encoding=Encoding.JPEG, data=photos.jpeg("coins"), captured_at=3.0)
    parsed = intake.parse("cam", encode(env, WireFormat.MSGPACK), "application/msgpack")
    assert (parsed.frame_id, parsed.captured_at) == ("x-9", 3.0)
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", b"\xff\xd8\xff" + bytes(250_000), None)
    assert caught.value.reason is ErrorReason.OVERSIZED
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", b"", None)
    assert caught.value.reason is ErrorReason.EMPTY


def test_topics_follow_the_brief():
    assert topics.frames("d1", "c1") == "edgefleet/d1/frames/c1"
    assert topics.predictions("d1", "c1") == "edgefleet/d1/predictions/c1"
    assert topics.errors("d1") == "edgefleet/d1/errors"
    assert topics.status("d1", "inference") == "edgefleet/d1/status/inference"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            topics.check_id("camera", bad)


def test_jpeg_size_reads_the_header():
    assert jpeg_size(photos.jpeg("hubble_deep_field")) == (872, 1000)
    assert jpeg_size(photos.png("coins")) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None


def test_a_compressed_batch_is_recognised_without_its_content_type():
    import time

    from shared.codec import WireFormat, decode, encode
    from shared.schemas import Gap, TelemetryBatch, TelemetryRecord

    gap = Gap(device="d", first_seq=1, last_seq=1, count=1, reason="expired", at=time.time())
    batch = TelemetryBatch(device="d", records=[TelemetryRecord(seq=2, body=gap)], sent_at=time.time())
    assert decode(TelemetryBatch, encode(batch, WireFormat.MSGPACK_ZLIB)) == batch
