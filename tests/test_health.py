"""Health that sees work, not only the broker link: a frozen process is reported and killed by the
health check (so a container run with an init exits and is restarted), a worker loop that stops coming
round makes the service unhealthy while its link is up, and one stuck past hang_exit_s ends the
process with the fatal status (Docker restarts on exit, never on `unhealthy`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from shared.config import CommonSettings, InferenceSettings, environment, load
from shared.health import check_health
from shared.lifecycle import FATAL_EXIT, Heartbeat, Liveness
from tests.support import ServiceProcess, wait_until

REPO = Path(__file__).resolve().parent.parent


def _health(file: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet", "health", str(file), *flags],
                          capture_output=True, text=True, cwd=REPO)


def test_a_frozen_inference_is_reported_unhealthy_and_killed_by_the_health_check(broker, model_dir, tmp_path):
    health = tmp_path / "alive"
    settings = load(InferenceSettings, None, mqtt_url=broker.url, device_id="edge-frozen", model_dir=model_dir,
                    health_file=health, health_interval_s=0.5)
    service = ServiceProcess(settings, tmp_path / "inference.log")
    try:
        wait_until(lambda: _health(health, "--max-age", "2", "--kill-after", "1").returncode == 0, 60,
                   "a healthy inference", interval=0.5)
        assert json.loads(health.read_text())["pid"] == service.proc.pid
        os.kill(service.proc.pid, signal.SIGSTOP)  # frozen whole: no thread of it can notice

        # Stale: unhealthy at once; killed only once silent for max-age + kill-after.
        stale = wait_until(lambda: (r := _health(health, "--max-age", "2", "--kill-after", "600")).returncode and r, 30,
                           "the frozen process reported unhealthy", interval=0.5)
        assert stale.stderr.startswith("no heartbeat for") and "killed" not in stale.stderr, stale.stderr
        answers = []

        def killed() -> bool:
            answers.append(_health(health, "--max-age", "2", "--kill-after", "1"))
            return not service.alive()

        wait_until(killed, 30, "the health check to kill the frozen process", interval=0.5)
        assert service.proc.returncode == -signal.SIGKILL
        assert all(a.returncode == 1 for a in answers), [a.stderr for a in answers]
        assert any("killed the frozen inference (pid" in a.stderr for a in answers), [a.stderr for a in answers]
    finally:
        service.kill()


class _Link:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()


class _Service:
    """Pure logic: what the heartbeat reads of a service (its link and its loops)."""

    def __init__(self) -> None:
        self.link, self.liveness = _Link(), Liveness()

    def run(self) -> int:
        return 0

    def stop(self) -> None:
        pass


def test_a_worker_loop_that_stops_coming_round_is_unhealthy_with_the_link_up_then_fatal(tmp_path):
    health = tmp_path / "alive"
    settings = CommonSettings(health_file=health, liveness_s=5, hang_exit_s=20)
    service, failures = _Service(), []
    beat = Heartbeat(settings, service, lambda reason, exc: failures.append(reason), "probe", start=False)
    with service.liveness.watch("worker") as worker:
        start = worker.due
        for second in range(1, 4):  # an idle loop: comes round with nothing to do, and is alive
            worker.due = start + second
            beat.beat(now=start + second + 0.5)
        assert check_health(health, 3, now=start + 4) == (True, f"healthy (pid {os.getpid()})")

        # It stops coming round; the link stays up.
        beat.beat(now=start + 9)
        ok, why = check_health(health, 3, now=start + 9)
        assert not ok and "the worker loop has not come round for 6 s" in why and "broker" not in why
        assert failures == []
        beat.beat(now=start + 24)
        assert failures == ["the worker loop has not come round for 21 s (hang_exit_s 20)"]

        worker.tick()  # back: healthy again (had hang_exit_s not ended it)
        beat.beat()
        assert check_health(health, 3)[0]
    beat.beat()  # a loop that ended is no longer watched
    assert check_health(health, 3)[0]
    service.link.connected.clear()
    beat.beat(now=start + 40)
    assert check_health(health, 3, now=start + 40) == (False, "unhealthy: broker link down")


HUNG = """
import sys, threading
from shared.config import CommonSettings
from shared.lifecycle import Liveness, serve

class Service:
    def __init__(self):
        self.stopping, self.liveness = threading.Event(), Liveness()
        self.worker = threading.Thread(target=self.work, name="worker")
    def work(self):
        with self.liveness.watch("worker") as progress:
            for _ in range(5):  # comes round a few times, then a real hang: a lock that is never released
                progress.tick()
                self.stopping.wait(0.1)
            lock = threading.Lock()
            lock.acquire()
            print("worker hung", flush=True)
            lock.acquire()
    def run(self):
        self.worker.start()
        self.stopping.wait()
        self.worker.join()
        return 0
    def stop(self):
        self.stopping.set()

raise SystemExit(serve("probe", CommonSettings(device_id="probe"), Service, ()))
"""


def test_a_hung_worker_ends_its_process_with_the_fatal_status(tmp_path):
    health = tmp_path / "alive"
    # Not a service: a script of its own, so started with the settings' environment, not the spawner.
    settings = load(CommonSettings, None, health_file=health, health_interval_s=0.2, liveness_s=1, hang_exit_s=2)
    env = {**os.environ, **environment(settings)}
    process = subprocess.run([sys.executable, "-c", HUNG], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
    assert process.returncode == FATAL_EXIT, process.stdout + process.stderr
    assert "worker hung" in process.stdout
    assert "fatal: the worker loop has not come round" in process.stderr
    last = json.loads(health.read_text())  # the drain never ended (the worker holds it): the file stayed, unhealthy
    assert last["problems"] and last["problems"][0].startswith("the worker loop has not come round")
