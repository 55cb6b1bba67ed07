"""The fleet console in a real browser (Debian's chromium, driven through chromium-driver by selenium)
against the README's main job: `edgefleet fleet --devices 2` as a child process, whose printed console
address the browser opens. A rollout started from the CLI (with the fleet's operator.env) appears on the
page without a reload, the drift and latency charts fill from the S3 telemetry, and a device that goes
dark turns stale. Screenshots of every step go to var/test-artifacts/console/. Beside it, on the
telemetry rig (a device broker bridged to the TLS fleet broker with the committed ACL): the console,
with its own certificate, sees a SIGKILLed service's last will and turns its device stale at once."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from edgefleet.certs import issue
from edgefleet.ports import free_port
from edgefleet.spawner import keys_of
from edgefleet.waiting import wait_until
from shared.config import ConsoleSettings, load

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "var/test-artifacts/console"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# As house rules and scripts/test-tools.sh have it: headless, as root, and no traffic but loopback.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,1400")
# The fleet quickened where it only costs CPU: statuses every second, stale after 3 s, a drift sample
# every 2 s once 10 predictions made the baseline, the charts read again every 2 s.
FLEET_ENV = {"EDGEFLEET_STATUS_INTERVAL_S": "1", "EDGEFLEET_CONSOLE_STALE_AFTER_S": "3",
             "EDGEFLEET_DRIFT_SAMPLE_INTERVAL_S": "2", "EDGEFLEET_DRIFT_BASELINE": "10",
             "EDGEFLEET_CONSOLE_TELEMETRY_REFRESH_S": "2"}

needs_chromium = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                    reason="needs Debian's chromium and chromium-driver (scripts/test-tools.sh)")


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

    def operator_env(self) -> dict[str, str]:
        """The operator's settings as the fleet wrote them (`source var/fleet/operator.env`)."""
        env = {}
        for line in (self.folder / "operator.env").read_text().splitlines():
            if line.startswith("export "):
                name, _, value = line[len("export "):].partition("=")
                env[name] = shlex.split(value)[0] if value else ""
        return env

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
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    # The driver named: selenium-manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def screenshots(request):
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def shown(driver, find, timeout: float, what: str):
    """Waits until `find(driver)` is truthy on the page as it is now (the page re-renders: retried)."""
    def attempt():
        try:
            return find(driver)
        except (StaleElementReferenceException, WebDriverException):
            return None

    return wait_until(attempt, timeout, what, interval=0.25)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # http://127.0.0.1 only
            return response.status == 200
    except OSError:
        return False


def row(driver, device: str):
    found = driver.find_elements(By.CSS_SELECTOR, f'#devices tr[data-device="{device}"]')
    return found[0] if found else None


def cell(driver, device: str, field: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#devices tr[data-device="{device}"] td[data-field="{field}"]').text


@needs_chromium
def test_the_console_shows_the_fleet_a_cli_rollout_live_the_charts_and_a_dark_device_stale(
        local_fleet, browser, screenshots):
    url = local_fleet.console_url()
    assert url.startswith("http://127.0.0.1:")
    wait_until(lambda: answers(url + "api/fleet"), 30, "the console to listen", interval=0.2)
    browser.get(url)

    # Every device: online, the model it serves, its sync state, predictions flowing.
    def fleet_listed(d):
        rows = [row(d, device) for device in ("device-1", "device-2")]
        return all(r is not None and r.get_attribute("data-health") == "online" and r.get_attribute("data-sync-state")
                   and cell(d, r.get_attribute("data-device"), "model") == "efficientnet-lite0 v1"
                   and float(cell(d, r.get_attribute("data-device"), "pred-per-s").replace("—", "0")) > 0
                   for r in rows)

    shown(browser, fleet_listed, 60, "both devices online with their model, sync state and pred/s")
    assert browser.find_element(By.ID, "connection").get_attribute("data-state") == "live"
    assert browser.find_element(By.ID, "broker").get_attribute("data-state") == "connected"
    browser.save_screenshot(str(screenshots / "1-devices.png"))

    # A rollout from the CLI, as the README's operator starts it: it appears without a reload.
    browser.execute_script("window.consoleNotReloaded = true;")
    started = subprocess.run(
        [sys.executable, "-m", "edgefleet", "rollout", "start", "efficientnet-lite0", "1", "--devices", "device-1"],
        cwd=REPO, env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
                       **local_fleet.operator_env()}, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.strip().splitlines()[-1]
    began = time.monotonic()
    rollout = shown(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'#rollout[data-rollout-id="{rollout_id}"]'),
                    10, f"rollout {rollout_id} on the page")
    appeared_s = time.monotonic() - began
    assert (rollout.get_attribute("data-model"), rollout.get_attribute("data-version"),
            rollout.get_attribute("data-phase")) == ("efficientnet-lite0", "1", "promoted")
    assert "devices device-1" in rollout.text
    # The devices' sync states on this rollout follow: device-1 takes it, device-2 is not targeted.
    shown(browser, lambda d: {li.get_attribute("data-device"): li.get_attribute("data-state") for li in
                              d.find_elements(By.CSS_SELECTOR, "#rollout .rollout-devices li")}.get("device-2")
          == "not_targeted" and d.find_elements(By.CSS_SELECTOR, '#rollout li[data-device="device-1"]'),
          20, "both devices' sync states on the rollout")
    assert browser.execute_script("return window.consoleNotReloaded === true;"), "the page was reloaded"
    browser.save_screenshot(str(screenshots / "2-rollout.png"))

    # Drift scores and latency over time, read back from the S3 telemetry the devices sent.
    def charted(d):
        cards = d.find_elements(By.CSS_SELECTOR, '#charts [data-chart-device="device-1"]')
        return cards and int(cards[0].get_attribute("data-samples")) >= 2 and cards[0].find_elements(
            By.CSS_SELECTOR, 'svg polyline[data-series="p95"]')

    shown(browser, charted, 30, "device-1's drift and latency charts from S3")
    browser.save_screenshot(str(screenshots / "3-charts.png"))

    # device-2 goes dark: its broker, its only way to the fleet, is killed. Its retained statuses on the
    # fleet broker stay "online" but age: the page turns it stale, device-1 stays online.
    local_fleet.device_broker("device-2").send_signal(signal.SIGKILL)
    shown(browser, lambda d: row(d, "device-2").get_attribute("data-health") == "stale", 15,
          "device-2 stale on the page")
    assert "no status for" in cell(browser, "device-2", "health")
    assert row(browser, "device-1").get_attribute("data-health") == "online"
    assert browser.execute_script("return window.consoleNotReloaded === true;"), "the page was reloaded"
    browser.save_screenshot(str(screenshots / "4-stale.png"))
    print(f"rollout on the page {appeared_s:.1f} s after the CLI returned; screenshots in {screenshots}")


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
