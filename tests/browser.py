"""The fleet console in a real browser, for the tests that drive it (tests/test_console.py, and the
README's first rollout in tests/test_tools.py): Debian's chromium through chromium-driver (selenium
never looks for or downloads a driver), and the page read the way a user sees it, from its DOM.

Reads go through one small script each (the page re-renders its tables on every server-sent event, so
elements found in one call may be gone by the next); waits retry them. Screenshots of each step go to
var/test-artifacts/console/<test>/."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from edgefleet.waiting import wait_until

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "var/test-artifacts/console"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# As house rules and scripts/test-tools.sh have it: headless, as root, and no traffic but loopback.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,1400")

needs_chromium = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                    reason="needs Debian's chromium and chromium-driver (scripts/test-tools.sh)")

# Every device row as the page shows it (data attributes and cell texts; services/console/page/console.js).
_DEVICES = """
return Array.from(document.querySelectorAll('#devices tr[data-device]')).map((tr) => {
  const text = (field) => (tr.querySelector(`td[data-field="${field}"]`) || {}).textContent || '';
  const detail = tr.querySelector('td[data-field="sync"] .detail');
  return {device: tr.dataset.device, health: tr.dataset.health, sync_state: tr.dataset.syncState,
          sync_reason: detail ? detail.textContent : '', model: text('model'), health_text: text('health'),
          pred_per_s: text('pred-per-s')};
});"""
_ROLLOUT = """
const r = document.getElementById('rollout');
if (!r || !r.dataset.rolloutId) return null;
const devices = {};
for (const li of r.querySelectorAll('.rollout-devices li')) devices[li.dataset.device] = li.dataset.state;
return {rollout_id: r.dataset.rolloutId, phase: r.dataset.phase, model: r.dataset.model,
        version: r.dataset.version, devices: devices, text: r.textContent};"""
_ROLLBACKS = """
return Array.from(document.querySelectorAll('#rollbacks li[data-device]')).map((li) => ({
  device: li.dataset.device, rollout_id: li.dataset.rolloutId, text: li.textContent,
  verdict: (li.querySelector('[data-field="verdict"]') || {}).textContent || ''}));"""
# Records every (rollout, device, state, sync reason) the page shows, as it re-renders: what a user
# watching it saw, including steps a later poll would miss. Also marks the page, so a reload (which
# would lose both) is seen.
_RECORD = """
window.consoleNotReloaded = true;
window.consoleSeen = [];
const panel = document.querySelector('main');
const record = () => {
  const r = document.getElementById('rollout');
  if (!r || !r.dataset.rolloutId) return;
  for (const li of r.querySelectorAll('.rollout-devices li')) {
    const device = li.dataset.device;
    const reason = document.querySelector(`#devices tr[data-device="${device}"] td[data-field="sync"] .detail`);
    const seen = [r.dataset.rolloutId, r.dataset.phase, device, li.dataset.state, reason ? reason.textContent : ''];
    const last = window.consoleSeen.filter((s) => s[2] === seen[2]).pop();
    if (!last || last.join('\\u0000') !== seen.join('\\u0000')) window.consoleSeen.push(seen);
  }
};
new MutationObserver(record).observe(panel, {childList: true, subtree: true});
record();"""


@contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    """Debian's chromium, headless, with a fresh profile in `profile`; quit on leaving."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # The driver named: selenium-manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


@contextmanager
def console_page(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ConsolePage]:
    """A test's page: chromium with its profile in `tmp_path`, screenshots under ARTIFACTS/<the test>/."""
    with chromium(tmp_path / "chromium") as driver:
        yield ConsolePage(driver, ARTIFACTS / request.node.name)


class ConsolePage:
    """The console's page in `driver`, read from its DOM; screenshots numbered into `folder`."""

    def __init__(self, driver: webdriver.Chrome, folder: Path) -> None:
        self.driver = driver
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._shots = 0

    def open(self, url: str) -> None:
        """Loads the page and starts recording what it shows (see `seen`)."""
        self.driver.get(url)
        self.shown(lambda: self.driver.execute_script(
            "return document.getElementById('connection').dataset.state === 'live';"), 30, "the page live")
        self.driver.execute_script(_RECORD)

    def shown(self, check: Callable[[], T], timeout: float, what: str) -> T:
        """Waits until `check()` is truthy on the page as it is now (retried while the page re-renders)."""
        def attempt() -> T | None:
            try:
                return check()
            except WebDriverException:
                return None

        found = wait_until(attempt, timeout, f"{what} on the page", interval=0.25)
        assert found is not None  # wait_until returns only a truthy result
        return found

    def devices(self) -> dict[str, dict[str, str]]:
        return {d["device"]: d for d in self.driver.execute_script(_DEVICES)}

    def rollout(self) -> dict[str, Any] | None:
        """The current model rollout's block: id, phase, model, version, each device's state, its text."""
        return self.driver.execute_script(_ROLLOUT)  # type: ignore[no-any-return]

    def rollbacks(self) -> list[dict[str, str]]:
        return self.driver.execute_script(_ROLLBACKS)  # type: ignore[no-any-return]

    def seen(self, rollout_id: str, device: str) -> list[tuple[str, str, str]]:
        """Every (phase, state, sync reason) the page showed for `device` on `rollout_id` since `open`."""
        return [(phase, state, reason) for rid, phase, d, state, reason in
                self.driver.execute_script("return window.consoleSeen || [];") if rid == rollout_id and d == device]

    def not_reloaded(self) -> bool:
        return self.driver.execute_script("return window.consoleNotReloaded === true;") is True

    def attribute(self, selector: str, name: str) -> str | None:
        return self.driver.execute_script(  # type: ignore[no-any-return]
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            selector, name)

    def screenshot(self, name: str) -> Path:
        self._shots += 1
        path = self.folder / f"{self._shots}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path
