"""Bad frames, property-based, at the real service: whatever arrives on a frames topic, the sender's
camera gets an error report, the service stays up and keeps answering good frames. (The codec's own
refusals, message type by message type, are pure logic: tests/unit/test_codec_limits.py.)"""

from __future__ import annotations

import itertools
import struct
import zlib

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet import photos
from edgefleet.waiting import wait_until
from tests.support import zlib_bomb

MAX_FRAME_BYTES = 300_000
JPEG = photos.jpeg("chelsea")
PNG = photos.png("coins")

envelope_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=64), st.lists(st.integers(-100, 100), max_size=3), st.sampled_from(["jpeg", "png", "gif"]),
)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is only its signature and an IHDR declaring width x height (8-bit RGB), then IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    """A JPEG whose start-of-frame declares width x height, with no image data worth decoding."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


# Over the budget of 25 megapixels, up to what a 16-bit (JPEG) or 31-bit (PNG) header can claim.
huge_dimensions = st.tuples(st.integers(5001, 65535), st.integers(5001, 65535))
bad_payloads = st.one_of(
    huge_dimensions.map(lambda wh: ("huge declared PNG", _png_header(*wh))),
    huge_dimensions.map(lambda wh: ("huge declared JPEG", _jpeg_header(*wh))),
    st.integers(1, 2000).map(lambda mib: ("zlib bomb", zlib_bomb(mib)[:MAX_FRAME_BYTES])),
    st.integers(1, 100_000).map(lambda depth: ("deep msgpack", b"\x91" * depth + b"\xc0")),
    st.binary(max_size=4096).map(lambda b: ("random bytes", b)),
    st.integers(0, len(JPEG) - 1).map(lambda n: ("truncated JPEG", JPEG[:n])),
    st.integers(0, len(PNG) - 1).map(lambda n: ("truncated PNG", PNG[:n])),
    st.integers(1, 50_000).map(lambda n: ("oversized", JPEG + bytes(MAX_FRAME_BYTES - len(JPEG) + n))),
    st.dictionaries(
        st.sampled_from(["frame_id", "encoding", "data", "captured_at", "camera", "extra"]), envelope_values, max_size=5
    ).map(lambda d: ("wrong envelope", msgpack.packb(d, use_bin_type=True))),
    st.binary(min_size=1, max_size=2048).map(
        lambda junk: ("envelope with junk data",
                      msgpack.packb({"frame_id": "junk", "encoding": "jpeg", "data": junk}))
    ),
)


def test_every_bad_frame_gets_an_error_and_good_frames_are_still_answered(broker, start_inference):
    service, device = start_inference(broker, max_frame_bytes=MAX_FRAME_BYTES)
    cameras = (f"bad-{n}" for n in itertools.count())
    seen_kinds: set[str] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(bad_payloads)
    def one_bad_frame(case):
        kind, payload = case
        camera = next(cameras)
        device.publish_frame(camera, payload)
        report = device.error_for(camera)
        assert report.reason in {"undecodable", "oversized", "malformed_envelope", "empty"}, (kind, report)
        if kind.startswith("huge declared"):
            assert report.reason == "oversized" and "x" in report.detail, report
        seen_kinds.add(kind)

    one_bad_frame()
    assert service.alive()
    every_kind = {"random bytes", "truncated JPEG", "oversized", "wrong envelope", "zlib bomb", "huge declared PNG"}
    assert every_kind <= seen_kinds
    device.publish_envelope("good", "good-1", photos.jpeg("coffee"))
    assert device.prediction_for("good-1").top[0].label in {"espresso", "cup", "coffee mug"}
    status = device.latest_status()
    assert status.state == "online"


def test_a_topic_naming_no_camera_id_is_refused_and_the_cameras_beside_it_are_answered(broker, start_inference):
    """A topic level may be 65535 bytes, and the camera it names becomes the prediction's topic, a counter's
    key and the error report's field: a name over the schemas' string limit once cost every frame batched
    after it its answer, and would have made the status unpublishable."""
    service, device = start_inference(broker)
    not_ids = ["x" * 5000, "cam 1", "-leading-dash", "c" * 65]
    for n, camera in enumerate(not_ids):
        device.publish_envelope("good", f"good-{n}", JPEG, qos=0)
        device.publish_envelope(camera, f"bad-{n}", JPEG, qos=0)
    device.publish_envelope("good", "good-last", JPEG)

    for n in range(len(not_ids)):
        assert device.prediction_for(f"good-{n}").camera == "good"
    assert device.prediction_for("good-last").camera == "good"

    def refused():
        reports = device.errors_of("invalid_camera")
        return reports if len(reports) == len(not_ids) else None

    reports = wait_until(refused, 30, "an invalid_camera report for each topic naming no camera id")
    assert all(r.camera is None and r.frame_id is None and "not a camera id" in r.detail for r in reports)
    assert all(len(r.detail) < 300 for r in reports)  # the 5000-character name is quoted clipped

    def balanced():
        s = device.latest_status()
        if s is None or s.inference is None:
            return None
        st = s.inference
        settled = st.frames_received == st.predictions_published + st.predictions_lost + st.frames_rejected \
            + st.frames_dropped
        return st if settled and st.frames_received == 2 * len(not_ids) + 1 else None

    stats = wait_until(balanced, 30, "a status counting every frame received as answered")
    assert stats.frames_rejected == len(not_ids) and stats.predictions_published == len(not_ids) + 1
    assert service.alive()
