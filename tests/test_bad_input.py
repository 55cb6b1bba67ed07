"""Bad input, property-based: whatever arrives on a frames topic, the sender's camera gets an error
report, the service stays up and keeps answering good frames."""

from __future__ import annotations

import itertools

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet import photos

MAX_FRAME_BYTES = 300_000
JPEG = photos.jpeg("chelsea")
PNG = photos.png("coins")

envelope_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=20),
    st.binary(max_size=64), st.lists(st.integers(-100, 100), max_size=3), st.sampled_from(["jpeg", "png", "gif"]),
)
bad_payloads = st.one_of(
    st.binary(max_size=4096).map(lambda b: ("random bytes", b)),
    st.integers(0, len(JPEG) - 1).map(lambda n: ("truncated JPEG", JPEG[:n])),
    st.integers(0, len(PNG) - 1).map(lambda n: ("truncated PNG", PNG[:n])),
    st.integers(1, 50_000).map(lambda n: ("oversized", JPEG + bytes(MAX_FRAME_BYTES - len(JPEG) + n))),
    st.dictionaries(
        st.sampled_from(["frame_id", "encoding", "data", "captured_at", "camera", "extra"]), envelope_values, max_size=5
    ).map(lambda d: ("wrong envelope", msgpack.packb(d, use_bin_type=True))),
    st.binary(min_size=1, max_size=2048).map(
        lambda junk: ("envelope with junk data", msgpack.packb({"frame_id": "junk", "encoding": "jpeg", "data": junk}))
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
        seen_kinds.add(kind)

    one_bad_frame()
    assert service.alive()
    assert {"random bytes", "truncated JPEG", "oversized", "wrong envelope"} <= seen_kinds
    device.publish_envelope("good", "good-1", photos.jpeg("coffee"))
    assert device.prediction_for("good-1").top[0].label in {"espresso", "cup", "coffee mug"}
    status = device.latest_status()
    assert status.state == "online"
