"""Hot swap in the inference service, driven over MQTT exactly as the sync service drives it."""

from __future__ import annotations

import threading
import time
import uuid

from edgefleet import photos
from edgefleet.models.store import resave
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.mqtt import content_type_of
from shared.schemas import ModelSwitch, ModelSwitched
from tests.support import wait_until


def _switch(device, model_dir, sha256):
    answers = []
    done = threading.Event()

    def on_switched(message):
        answers.append(decode(ModelSwitched, message.payload, content_type_of(message)))
        done.set()

    device.link.subscribe(topics.model_switched(device.device_id), on_switched)
    time.sleep(0.2)
    request = ModelSwitch(request_id=uuid.uuid4().hex, model_dir=str(model_dir), sha256=sha256, at=time.time())
    device.link.publish(topics.model_switch(device.device_id), encode(request), qos=1, content_type=WireFormat.JSON.content_type)
    assert done.wait(60), "no answer to the switch"
    return next(a for a in answers if a.request_id == request.request_id)


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

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        time.sleep(1)
        result = _switch(device, tmp_path / "v2", other.sha256)
        assert result.ok and result.serving.version == 2 and result.load_ms > 0
        time.sleep(1)
    finally:
        stop.set()
        feeder.join()
    wait_until(lambda: len(device.predictions) >= len(sent), 30, "every frame's answer")
    ids = [p.frame_id for p in device.predictions]
    assert sorted(ids) == sorted(sent), "a frame was dropped or answered twice"
    versions = [p.model.version for p in sorted(device.predictions, key=lambda p: int(p.frame_id[1:]))]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), "each batch names its model"
    assert all(p.top[0].label in {"tabby", "tiger cat", "Egyptian cat"} for p in device.predictions)


def test_a_bad_switch_is_refused_and_the_old_model_keeps_serving(broker, start_inference, model_dir, tmp_path):
    _, device = start_inference(broker)
    refused = _switch(device, model_dir, "0" * 64)  # not the SHA-256 that folder holds
    assert not refused.ok and "switch asked for" in refused.error and refused.serving.version == 1
    missing = _switch(device, tmp_path / "nowhere", "0" * 64)
    assert not missing.ok and "manifest" in missing.error
    device.link.publish(topics.model_switch(device.device_id), b"{not json", qos=1)
    report = wait_until(lambda: next((e for e in device.errors if e.reason == "malformed_command"), None), 30, "an error report")
    assert "model switch" in report.detail
    device.publish_envelope("cam", "after", photos.jpeg("coffee"))
    assert device.prediction_for("after").model.version == 1
