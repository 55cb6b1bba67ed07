"""The shipped images, built by scripts/images.sh in the background from the moment the tests are
collected: the build is mostly downloads and layer writes, so it overlaps the suite's other tests
instead of adding its minutes to theirs. In one process the tests that need the images run last; under
pytest-xdist (scripts/test.sh) one worker runs them first, waiting for the build while the other
worker's tests go on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Under pytest-xdist every worker may call start_build: the first worker's build starts when collection
# ends, another's only when a test of its own waits for the images (the group landed there). flock makes
# that second build wait for the first, then find its layers built and cached; each writes its own log.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
LOG = REPO / "var" / "log" / ("images.log" if _WORKER == "gw0" else f"images-{_WORKER}.log")
_LOCK = REPO / "var" / "log" / "images.lock"
_build: subprocess.Popen | None = None


def engine_available() -> bool:
    """A Docker engine answers (scripts/engine.sh starts one where the tests run)."""
    return bool(shutil.which("docker")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def start_build() -> None:
    """Starts scripts/images.sh unless this process started it already; its output goes to LOG."""
    global _build
    if _build is None:
        LOG.parent.mkdir(parents=True, exist_ok=True)
        _build = subprocess.Popen(["flock", str(_LOCK), str(REPO / "scripts" / "images.sh")], stdout=LOG.open("wb"),
                                  stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def wait_built(timeout: float = 1800) -> None:
    """Raises AssertionError with the build's log when scripts/images.sh failed."""
    start_build()
    assert _build is not None
    try:
        _build.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"scripts/images.sh still running after {timeout:g} s:\n"
                             f"{LOG.read_text()[-4000:]}") from None
    if _build.returncode != 0:
        raise AssertionError(f"scripts/images.sh exited {_build.returncode}:\n{LOG.read_text()[-4000:]}")


def stop_build() -> None:
    """Ends a build still running when the session ends (its docker builds are left to finish alone)."""
    if _build is not None and _build.poll() is None:
        os.killpg(_build.pid, signal.SIGTERM)
        _build.wait(10)
