"""The third-party clients in examples/, as a user runs them: a real Mosquitto, the real `edgefleet
inference` process, and the two example scripts as their own processes. The camera's photo comes back
as a prediction that the listener prints."""

from __future__ import annotations

import ast
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgefleet import photos

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("paho_camera.py", "paho_listener.py")
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
# What examples/paho_listener.py prints for a prediction: camera, frame id, best label, its confidence.
PRINTED = re.compile(r"^(?P<camera>\S+) (?P<frame>\S+): (?P<label>.+) (?P<score>[01]\.\d{3})$")


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_example_imports_only_what_a_third_party_has(script):
    """An example shows a client that knows only docs/protocol.md: no edgefleet, shared or services."""
    tree = ast.parse((EXAMPLES / script).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name.split(".")[0] for name in imported} <= {"argparse", "json", "paho"}, imported


def _lines_of(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout], daemon=True).start()
    return lines


def test_the_example_cameras_photo_is_printed_by_the_example_listener(broker, start_inference, tmp_path):
    _, device = start_inference(broker)
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(photos.jpeg("chelsea"))
    where = ["--host", "127.0.0.1", "--port", str(broker.port), "--device", device.device_id]
    listener = subprocess.Popen([sys.executable, str(EXAMPLES / "paho_listener.py"), *where],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _lines_of(listener)
        # The listener says nothing once it is subscribed: the camera sends until a prediction is printed.
        for _ in range(30):
            camera = subprocess.run(
                [sys.executable, str(EXAMPLES / "paho_camera.py"), str(photo), *where, "--camera", "porch"],
                capture_output=True, text=True, timeout=60,
            )
            assert camera.returncode == 0, camera.stdout + camera.stderr
            assert "sent" in camera.stdout
            try:
                printed = lines.get(timeout=1)
                break
            except queue.Empty:
                assert listener.poll() is None, f"the listener exited: {listener.returncode}"
        else:
            pytest.fail("the listener printed nothing for 30 frames")
        shown = PRINTED.match(printed)
        assert shown, f"the listener printed {printed!r}"
        assert shown["camera"] == "porch" and shown["frame"].startswith("porch-")
        assert shown["label"] in CATS and 0 < float(shown["score"]) <= 1
        # What it printed is the service's prediction for that frame, as the test's own client saw it.
        best = device.prediction_for(shown["frame"]).top[0]
        assert (best.label, f"{best.score:.3f}") == (shown["label"], shown["score"])
    finally:
        listener.terminate()
        listener.wait(10)
