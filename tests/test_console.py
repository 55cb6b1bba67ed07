"""The fleet console in a real browser (Debian's chromium, driven through chromium-driver by selenium:
tests/browser.py) against the README's main job: `edgefleet fleet --devices 2` as a child process, whose
printed console address the browser opens. What the README's first rollout (tests/test_tools.py, the
rollout and its verdict on the page) does not prove is proved here: the devices listed live, the drift
and latency charts filled from the S3 telemetry, and a device that goes dark turning stale, all without a
reload. Screenshots of every step go to var/test-artifacts/console/. Beside it, on the telemetry rig (a
device broker bridged to the TLS fleet broker with the committed ACL): the console, with its own
certificate, sees a SIGKILLed service's last will and turns its device stale at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest

from edgefleet.certs import issue
from edgefleet.ports import free_port
from edgefleet.spawner import keys_of
from edgefleet.waiting import wait_until
from shared.config import ConsoleSettings, load
from tests.browser import console_page, needs_chromium

REPO = Path(__file__).resolve().parent.parent
# The fleet quickened where it only costs CPU: statuses every second, stale after 3 s, a drift sample
# every 2 s once 10 predictions made the baseline (scores on 10 more), the charts read again every 2 s.
FLEET_ENV = {"EDGEFLEET_STATUS_INTERVAL_S": "1", "EDGEFLEET_CONSOLE_STALE_AFTER_S": "3",
             "EDGEFLEET_DRIFT_SAMPLE_INTERVAL_S": "2", "EDGEFLEET_DRIFT_BASELINE": "10",
             "EDGEFLEET_DRIFT_MIN_SAMPLES": "10", "EDGEFLEET_CONSOLE_TELEMETRY_REFRESH_S": "2"}


class LocalFleet:
    """`edgefleet fleet` in its own session, its output collected line by line."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(FLEET_ENV, EDGEFLEET_CONSOLE_PORT=str(free_port()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "fleet", "--devices", "2", "--rate", "2", "--folder", str(folder),
             "--duration", "240"],  # a safety net: a fleet this test leaked ends by itself
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def console_url(self) -> str:
        def printed() -> str | None:
            assert self.proc.poll() is None, f"the fleet exited:\n{self.output()}"
            found = re.search(r"^console: (http://\S+)$", self.output(), re.M)
            return found.group(1) if found else None

        return wait_until(printed, 120, "the fleet to print the console's address")

    def device_broker(self, device: str) -> psutil.Process:
        """The Mosquitto of one device (its only way to the fleet broker), among the fleet's children."""
        conf = str(self.folder / device / "broker")
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.name() == "mosquitto" and any(conf in arg for arg in child.cmdline()):
                return child
        raise AssertionError(f"no broker of {device} among the fleet's processes")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the fleet stops its children in order
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def local_fleet(tmp_path, model_dir, request):
    fleet = LocalFleet(tmp_path / "fleet")
    yield fleet
    fleet.stop()
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        print(f"--- edgefleet fleet output\n{fleet.output()[-5000:]}")
        for log in sorted((fleet.folder / "log").glob("console*.log")):
            print(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def page(request, tmp_path):
    """The fleet console's page in chromium (tests/browser.py)."""
    with console_page(request, tmp_path) as opened:
        yield opened


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # http://127.0.0.1 only
            return response.status == 200
    except OSError:
        return False


@needs_chromium
def test_the_console_shows_the_fleet_live_its_charts_and_a_dark_device_stale(local_fleet, page):
    url = local_fleet.console_url()
    assert url.startswith("http://127.0.0.1:")
    wait_until(lambda: answers(url + "api/fleet"), 30, "the console to listen", interval=0.2)
    page.open(url)  # from here on never reloaded: what follows arrives by server-sent events

    # Every device: online, the model it serves, its sync state, predictions flowing.
    def listed(device: str) -> bool:
        d = page.devices().get(device, {})
        return (d.get("health") == "online" and bool(d.get("sync_state")) and d.get("model") == "efficientnet-lite0 v1"
                and float(d.get("pred_per_s", "—").replace("—", "0")) > 0)

    page.shown(lambda: listed("device-1") and listed("device-2"), 60,
               "both devices online with their model, sync state and pred/s")
    assert page.attribute("#connection", "data-state") == "live"
    assert page.attribute("#broker", "data-state") == "connected"
    page.screenshot("devices")

    # Drift scores and latency over time, read back from the S3 telemetry the devices sent.
    def charted() -> bool:
        card = '#charts [data-chart-device="device-1"]'
        samples = page.attribute(card, "data-samples")
        return samples is not None and int(samples) >= 2 and all(page.attribute(
            f'{card} figure[data-chart="{chart}"] svg polyline', "points") for chart in ("drift scores", "latency"))

    page.shown(charted, 30, "device-1's drift and latency charts from S3")
    page.screenshot("charts")

    # device-2 goes dark: its broker, its only way to the fleet, is killed. Its retained statuses on the
    # fleet broker stay "online" but age: the page turns it stale, device-1 stays online.
    local_fleet.device_broker("device-2").send_signal(signal.SIGKILL)
    page.shown(lambda: page.devices()["device-2"]["health"] == "stale", 15, "device-2 stale")
    devices = page.devices()
    assert "no status for" in devices["device-2"]["health_text"]
    assert devices["device-1"]["health"] == "online"
    assert page.not_reloaded(), "the page was reloaded"
    page.screenshot("stale")


def test_a_sigkilled_service_turns_its_device_stale_at_once_through_its_last_will(uplink):
    issue(uplink.certs, "console")
    port = free_port()
    console = uplink.services.start(load(
        ConsoleSettings, None, **keys_of(uplink.s3_server.settings()), mqtt_url=uplink.cloud_url, device_id="console",
        mqtt_ca_file=uplink.certs / "ca.crt", mqtt_cert_file=uplink.certs / "console.crt",
        mqtt_key_file=uplink.certs / "console.key", mqtt_reconnect_max_s=1,
        console_port=port, console_stale_after_s=120), "console", "console")
    telemetry = uplink.start_telemetry()
    url = f"http://127.0.0.1:{port}/api/fleet"

    def device():
        assert console.alive(), console.log()
        if not answers(url):
            return None
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # http://127.0.0.1 only
            snapshot = json.load(response)
        return next((d for d in snapshot["devices"] if d["device"] == uplink.device_id), None)

    # Read through the committed ACL's console block: the device's retained status, bridged to the fleet.
    online = wait_until(lambda: (d := device()) and d["health"] == "online" and d, 30, "the device online")
    assert online["services"] == {"telemetry": "online"} and online["outbox_records"] is not None
    telemetry.kill()
    # Long before stale_after_s (120 s): the service's will, published by the device broker when the
    # connection died and bridged to the fleet broker, says it is offline.
    stale = wait_until(lambda: (d := device()) and d["health"] == "stale" and d, 30, "the device stale")
    assert stale["health_reason"] == "telemetry offline (connection lost)"
    assert stale["services"] == {"telemetry": "offline"}
