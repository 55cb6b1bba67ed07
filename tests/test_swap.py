"""Hot swap in the inference service, driven over MQTT exactly as the sync service drives it."""

from __future__ import annotations

import threading
import time
import uuid

from edgefleet import photos
from edgefleet.models.install import resave
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.mqtt import content_type_of
from shared.schemas import ModelSwitch, ModelSwitched
from tests.support import wait_until


def _switch(device, model_dir, sha256):
    answers = []

    def on_switched(message):
        answers.append(decode(ModelSwitched, message.payload, content_type_of(message)))

    # No pause after subscribing: the broker handles one connection's packets in order (MQTT 3.1.1
    # section 4.6), so this SUBSCRIBE is in force before the request below can reach inference.
    device.link.subscribe(topics.model_switched(device.device_id), on_switched)
    request = ModelSwitch(request_id=uuid.uuid4().hex, model_dir=str(model_dir), sha256=sha256, at=time.time())
    device.link.publish(topics.model_switch(device.device_id), encode(request), qos=1,
                        content_type=WireFormat.JSON.content_type)
    return wait_until(lambda: next((a for a in answers if a.request_id == request.request_id), None), 60,
                      "the answer to the switch")


def test_a_switch_mid_stream_answers_every_frame_once_and_names_the_model(broker, start_inference, model_dir, tmp_path):
    other = resave(model_dir, tmp_path / "v2", "rebuilt", version=2)
    _, device = start_inference(broker)
    sent = []
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            frame_id = f"f{len(sent)}"
            device.publish_envelope("cam", frame_id, photos.jpeg("chelsea"))
            sent.append(frame_id)
            time.sleep(0.02)

    def answered(version: int, count: int) -> bool:
        return sum(p.model.version == version for p in list(device.predictions)) >= count

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        wait_until(lambda: answered(1, 5), 30, "frames answered by v1 before the switch")
        result = _switch(device, tmp_path / "v2", other.sha256)
        assert result.ok and result.serving.version == 2 and result.load_ms > 0
        wait_until(lambda: answered(2, 5), 30, "frames answered by v2 after the switch")
    finally:
        stop.set()
        feeder.join()
    wait_until(lambda: len(device.predictions) >= len(sent), 30, "as many answers as frames")
    # Then a sentinel: the backlog is drained once it is answered, so a late second answer to any frame
    # would be in by now and show below as a mismatch.
    device.publish_envelope("cam", "sentinel", photos.jpeg("chelsea"))
    device.prediction_for("sentinel")
    answers = [p for p in device.predictions if p.frame_id != "sentinel"]
    assert sorted(p.frame_id for p in answers) == sorted(sent), "a frame was dropped or answered twice"
    versions = [p.model.version for p in sorted(answers, key=lambda p: int(p.frame_id[1:]))]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), "each batch names its model"
    assert all(p.top[0].label in {"tabby", "tiger cat", "Egyptian cat"} for p in device.predictions)


def test_a_bad_switch_is_refused_and_the_old_model_keeps_serving(broker, start_inference, model_dir, tmp_path):
    _, device = start_inference(broker)
    refused = _switch(device, model_dir, "0" * 64)  # not the SHA-256 that folder holds
    assert not refused.ok and "switch asked for" in refused.error and refused.serving.version == 1
    missing = _switch(device, tmp_path / "nowhere", "0" * 64)
    assert not missing.ok and "manifest" in missing.error
    device.link.publish(topics.model_switch(device.device_id), b"{not json", qos=1)
    report = wait_until(lambda: next((e for e in device.errors if e.reason == "malformed_command"), None), 30,
                        "an error report")
    assert "model switch" in report.detail
    device.publish_envelope("cam", "after", photos.jpeg("coffee"))
    assert device.prediction_for("after").model.version == 1
