"""A cascade served by the real `edgefleet inference` process on a real Mosquitto: the static INT8
model first, the FP32 model for the frames it is unsure of, on real photos."""

from __future__ import annotations

from edgefleet import photos
from edgefleet.models.cascade import assemble
from shared.manifest import load_verified
from tests.support import wait_until

# Photos the INT8 stage calls with a wide top-1 margin (0.90-0.93 measured, at JPEG quality 90 and
# 80), and photos it cannot call (0.00-0.09): far from the 0.4 threshold.
CLEAR = ("coffee", "camera")
UNCLEAR = ("astronaut", "grace_hopper")
THRESHOLD = 0.4


def test_a_served_cascade_names_itself_and_the_stage_that_answered_and_counts_escalations(
        broker, start_inference, model_dir, int8_dir, tmp_path):
    small, _ = load_verified(int8_dir)  # the session's static INT8 (tests/conftest.py), read only
    cascade = assemble(int8_dir, model_dir, tmp_path / "cascade", name="lite0-cascade", version=1,
                       metric="margin", threshold=THRESHOLD)
    large, _ = load_verified(model_dir)
    _, device = start_inference(broker, model_dir=tmp_path / "cascade", max_batch=4)
    names = [name for pair in zip(CLEAR, UNCLEAR, strict=True) for name in pair]
    frames = [(f"q{quality}-{name}", photos.jpeg(name, quality)) for quality in (90, 80) for name in names]

    for frame_id, jpeg in frames:
        device.publish_envelope("cam", frame_id, jpeg)
    predictions = [device.prediction_for(frame_id) for frame_id, _ in frames]
    status = wait_until(lambda: (s := device.latest_status()) is not None and s.inference is not None
                        and s.inference.predictions_published == len(frames) and s, 30, "the counters' status")

    assert status.model == cascade.ref()
    assert all(p.model == cascade.ref() and p.cascade is not None for p in predictions)
    assert all((p.cascade.small, p.cascade.large) == (small.ref(), large.ref()) for p in predictions if p.cascade)
    stages = {p.frame_id: p.cascade.stage for p in predictions if p.cascade}
    assert {stage for frame, stage in stages.items() if frame.endswith(CLEAR)} == {1}, stages
    assert {stage for frame, stage in stages.items() if frame.endswith(UNCLEAR)} == {2}, stages
    assert all((p.cascade.score < THRESHOLD) == (p.cascade.stage == 2) for p in predictions if p.cascade)
    assert status.inference is not None
    assert status.inference.predictions_escalated == sum(stage == 2 for stage in stages.values()) == len(frames) // 2
