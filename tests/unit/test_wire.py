"""The wire format: schemas, codec, topics, frame intake (pure logic)."""

from __future__ import annotations

import zlib

import cv2
import msgpack
import numpy as np
import pytest

from edgefleet import photos
from services.inference.decode import image_size, jpeg_size, png_size
from services.inference.intake import FrameRejected, Intake
from shared import topics
from shared.codec import DecodeError, WireFormat, decode, encode, inflate
from shared.schemas import Encoding, ErrorReason, FrameEnvelope
from tests.support import zlib_bomb


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
    for bad in ("a/b", "+", "#", "", "x" * 65, "door\n", "cam 1", "-cam"):  # "$" let a trailing newline by
        with pytest.raises(ValueError):
            topics.check_id("camera", bad)
        assert not topics.is_id(bad)
    assert topics.is_id("door") and topics.is_id("c" * 64) and topics.check_id("camera", "cam-1.b_2") == "cam-1.b_2"


def test_jpeg_size_reads_the_header():
    assert jpeg_size(photos.jpeg("hubble_deep_field")) == (872, 1000)
    assert jpeg_size(photos.png("coins")) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None


def test_a_compressed_batch_is_recognised_without_its_content_type_only_where_asked():
    import time

    from shared.codec import WireFormat, decode, encode
    from shared.schemas import Gap, TelemetryBatch, TelemetryRecord

    gap = Gap(device="d", first_seq=1, last_seq=1, count=1, reason="expired", at=time.time())
    epoch = {"epoch": "0123abcd"} if "epoch" in TelemetryBatch.model_fields else {}
    batch = TelemetryBatch(device="d", **epoch, records=[TelemetryRecord(seq=2, body=gap)], sent_at=time.time())
    packed = encode(batch, WireFormat.MSGPACK_ZLIB)
    assert decode(TelemetryBatch, packed, sniff_compressed=True) == batch
    with pytest.raises(DecodeError):
        decode(TelemetryBatch, packed)


ZLIB = WireFormat.MSGPACK_ZLIB.content_type


def test_a_zlib_bomb_is_refused_at_the_cap_without_inflating_it():
    bomb = zlib_bomb(2048)  # 2 GiB of zeros in ~2 MB
    with pytest.raises(DecodeError, match="cap of 65536 bytes"):
        inflate(bomb, 65536)
    with pytest.raises(DecodeError, match="cap"):
        decode(FrameEnvelope, bomb, ZLIB, max_inflated_bytes=65536)


def test_inflate_refuses_a_truncated_stream_and_takes_one_exactly_at_the_limit():
    data = bytes(range(256)) * 40
    packed = zlib.compress(data)
    with pytest.raises(DecodeError, match="truncated"):
        inflate(packed[: len(packed) // 2], len(data))
    assert inflate(packed, len(data)) == data
    with pytest.raises(DecodeError, match="cap"):
        inflate(packed, len(data) - 1)


def test_a_frame_is_never_sniffed_for_compression():
    """A zlib stream with no content type is not inflated: it is just not an envelope."""
    intake = Intake(max_frame_bytes=4 * 1024 * 1024)
    bomb = zlib_bomb(3000)  # ~3 MB, inflating to ~3 GB
    assert bomb[:1] == b"\x78"
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", bomb, None)
    assert caught.value.reason is ErrorReason.MALFORMED_ENVELOPE


def test_a_declared_compressed_envelope_inflates_at_most_to_max_frame_bytes():
    intake = Intake(max_frame_bytes=100_000)
    jpeg = photos.jpeg("chelsea")
    small = FrameEnvelope(frame_id="z-1", encoding=Encoding.JPEG, data=jpeg)
    assert intake.parse("cam", encode(small, WireFormat.MSGPACK_ZLIB), ZLIB).data == jpeg
    # Compresses below max_frame_bytes, inflates above it (the old default cap, 16 MiB, let it in).
    big = FrameEnvelope(frame_id="z-2", encoding=Encoding.JPEG, data=jpeg + bytes(3 * 1024 * 1024))
    payload = encode(big, WireFormat.MSGPACK_ZLIB)
    assert len(payload) < 100_000
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", payload, ZLIB)
    assert caught.value.reason is ErrorReason.MALFORMED_ENVELOPE and "cap of 100000" in caught.value.detail


def _png(height: int, width: int) -> bytes:
    return cv2.imencode(".png", np.zeros((height, width), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


def test_png_size_reads_ihdr():
    assert png_size(photos.png("coins")) == (303, 384)
    assert image_size(photos.png("coins")) == (303, 384)
    assert image_size(photos.jpeg("hubble_deep_field")) == (872, 1000)
    assert png_size(photos.jpeg("chelsea")) is None and image_size(b"\x89PNG\r\n\x1a\n") is None


def test_intake_refuses_more_pixels_than_the_budget_before_decoding():
    intake = Intake(max_frame_bytes=4 * 1024 * 1024, max_frame_pixels=25_000_000)
    huge = _png(8000, 8000)
    assert len(huge) < 300_000
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", huge, None)
    assert caught.value.reason is ErrorReason.OVERSIZED and "8000x8000" in caught.value.detail
    envelope = FrameEnvelope(frame_id="big-1", encoding=Encoding.PNG, data=huge)
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", encode(envelope, WireFormat.MSGPACK), "application/msgpack")
    assert (caught.value.reason, caught.value.frame_id) == (ErrorReason.OVERSIZED, "big-1")
    assert intake.parse("cam", _png(4000, 6000), None).data.startswith(b"\x89PNG")
    with pytest.raises(FrameRejected) as caught:
        intake.parse("cam", b"\xff\xd8\xff\xe0 no frame header here", None)
    assert caught.value.reason is ErrorReason.UNDECODABLE
