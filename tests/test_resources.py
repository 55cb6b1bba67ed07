"""Per-container CPU and memory through the Docker API, against the real Docker engine of this machine
and real containers: only this device's compose project is reported, the figures are those `docker
stats` shows, the commit loop never waits for the engine, and without EDGEFLEET_DOCKER_URL no Docker
call is made at all. Under CI=true a missing engine (or base image) fails these tests; elsewhere they
are skipped with the reason."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from services.telemetry.resources import PROJECT_LABEL, ResourceMonitor, container_sample, cpu_percent, own_project
from tests.support import wait_until

# After the images build (tests/image_build.py): the containers here run the python:3.11-slim stand-in.
pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parent.parent
SOCKET = Path("/var/run/docker.sock")
DOCKER_URL = f"unix://{SOCKET}"
IMAGE = "python:3.11-slim"  # the local stand-in the tests build for the Dockerfile's base (README, Deployment)
RUN = uuid.uuid4().hex[:8]
PROJECT, OTHER = f"efh-res-{RUN}-a", f"efh-res-{RUN}-b"
BUSY, IDLE, ELSEWHERE = f"efh-res-busy-{RUN}", f"efh-res-idle-{RUN}", f"efh-res-other-{RUN}"
LIMIT = 96 * 1024 * 1024
CACHE_MB = 24  # written to a file by the idle container: page cache that `docker stats` does not count


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}: the container tests must run here", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    """The docker.APIClient of the running engine, with the base image present."""
    import docker

    try:
        api = docker.APIClient(base_url=DOCKER_URL, timeout=30)
        api.ping()
    except Exception as exc:  # any reason the engine cannot be used is the reason given
        _missing(f"no Docker engine at {SOCKET} ({type(exc).__name__}: {exc})")
    from tests.image_build import wait_built

    wait_built()  # the session's build makes the python:3.11-slim stand-in where it is missing
    try:
        api.inspect_image(IMAGE)
    except docker.errors.ImageNotFound:
        _missing(f"the image {IMAGE} is not built (scripts/images.sh makes the local stand-in)")
    yield api
    api.close()


def _docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def containers(engine):
    """Three real containers: two of PROJECT (one burning half a core under a memory limit, one idle with
    page cache), one of another project. Removed at the end, whatever happened."""
    started: list[str] = []

    def run(name: str, project: str, *args: str) -> str:
        started.append(name)
        return _docker("run", "-d", "--network", "host", "--name", name, "--label", f"{PROJECT_LABEL}={project}", *args)

    try:
        # --cpus 0.5: busy enough to tell apart, without taking a core from the other tests on 2 cores.
        run(BUSY, PROJECT, "--cpus", "0.5", "--memory", str(LIMIT), IMAGE, "python3", "-c", "while True: pass")
        run(IDLE, PROJECT, IMAGE, "python3", "-c",
            f"import time; open('/tmp/cache', 'wb').write(b'x' * {CACHE_MB << 20}); "
            "print('ready', flush=True); time.sleep(3600)")
        run(ELSEWHERE, OTHER, IMAGE, "python3", "-c", "import time; time.sleep(3600)")
        wait_until(lambda: "ready" in _docker("logs", IDLE), 60, "the idle container's page cache written")
        yield {name: engine.inspect_container(name) for name in (BUSY, IDLE, ELSEWHERE)}
    finally:
        for name in started:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


@pytest.fixture
def monitors(tmp_path):
    """Makes ResourceMonitors and stops every one at the end."""
    made: list[ResourceMonitor] = []

    def make(**settings) -> ResourceMonitor:
        monitor = ResourceMonitor("edge-r", tmp_path, **{"interval_s": 0.2, **settings})
        made.append(monitor)
        monitor.start()
        return monitor

    yield make
    for monitor in made:
        monitor.stop()


def _by_name(monitor: ResourceMonitor) -> dict:
    return {c.name: c for c in monitor.sample().containers}


def _mib(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)\s*([KMG]i?B|B)", text.strip()).groups()
    return float(value) * {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def test_only_this_projects_containers_are_reported_with_the_figures_docker_stats_shows(containers, monitors):
    monitor = monitors(docker_url=DOCKER_URL, docker_project=PROJECT)
    figures = wait_until(lambda: (f := _by_name(monitor)).keys() == {BUSY, IDLE} and f[BUSY].cpu_percent > 20 and f,
                         60, "both containers of the project reported, the busy one busy")
    busy, idle = figures[BUSY], figures[IDLE]
    assert busy.cpu_percent <= 60, "a 0.5-core quota is about 50 % of one core, as `docker stats` counts"
    assert idle.cpu_percent < 5 < busy.cpu_percent
    assert busy.memory_limit_bytes == LIMIT and 0 < busy.memory_bytes <= LIMIT
    assert idle.memory_limit_bytes == psutil.virtual_memory().total and 0 < idle.memory_bytes <= idle.memory_limit_bytes
    # Memory as the Docker CLI reports it (usage less the inactive page cache), not the raw cgroup usage
    # (which holds the idle container's CACHE_MB file): read back from `docker stats` itself.
    shown = json.loads(_docker("stats", "--no-stream", "--format", "{{json .}}", IDLE))
    reported = _by_name(monitor)[IDLE].memory_bytes / 2**20
    assert abs(_mib(shown["MemUsage"].split("/")[0]) - reported) < 1.0, (shown["MemUsage"], reported)
    assert monitor.docker.project == PROJECT
    # The other project's container ran before the monitor started, so a whole sweep would have met it
    # unless the filter left it out; a monitor of that project reports it, and only it.
    wait_until(lambda: monitor.docker.sweeps.value >= 1, 60, "a whole sweep of the containers")
    assert _by_name(monitor).keys() == {BUSY, IDLE}
    other = monitors(docker_url=DOCKER_URL, docker_project=OTHER)
    wait_until(lambda: other.docker.sweeps.value >= 1, 60, "a whole sweep of the other project")
    assert _by_name(other).keys() == {ELSEWHERE}


def test_the_raw_usage_would_count_the_page_cache(containers, engine):
    """What the memory figure leaves out is really there: the idle container's cgroup counts its file."""
    stats = engine.stats(IDLE, stream=False)
    memory = stats["memory_stats"]["stats"]
    cached = memory.get("total_inactive_file", memory.get("inactive_file", 0))
    assert cached >= (CACHE_MB << 20) // 2, stats["memory_stats"]
    assert container_sample(IDLE, stats, time.time()).memory_bytes == stats["memory_stats"]["usage"] - cached


def test_cpu_percent_counts_the_cores_where_online_cpus_is_missing(containers, engine):
    """Engines before API 1.27 send no online_cpus: the cores are those percpu_usage lists, not one."""
    stats = engine.stats(BUSY, stream=False)
    cores = len(stats["cpu_stats"]["cpu_usage"].get("percpu_usage") or ())
    if cores < 2:
        pytest.skip("this engine sends no percpu_usage (cgroup v2) or has one core: nothing to tell apart")
    with_online = cpu_percent(stats)
    del stats["cpu_stats"]["online_cpus"]
    assert with_online > 20 and cpu_percent(stats) == with_online


class HeldSocket:
    """A transparent relay in front of the engine's socket that can hold the requests sent through it:
    the monitor talks to the real engine, and the test can stop its answers like a hung daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held: list[bytes] = []  # requests waiting at the gate
        self._open = threading.Event()
        self._open.set()
        self._holding = b""
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, path_part: bytes = b"") -> None:
        """Holds every request whose request line contains `path_part` (every request: b"")."""
        self._holding = path_part
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.release()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(SOCKET))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if requests and not self._open.is_set() and self._holding in chunk.split(b"\r\n", 1)[0]:
                    self.held.append(chunk)
                    self._open.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):  # the other pump sees the end and closes in turn
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            source.close()


def test_sample_returns_the_last_figures_while_a_stats_call_hangs(containers, monitors, tmp_path):
    relay = HeldSocket(tmp_path / "docker.sock")
    try:
        monitor = monitors(docker_url=f"unix://{relay.path}", docker_project=PROJECT)
        before = wait_until(lambda: (f := _by_name(monitor)).keys() == {BUSY, IDLE} and f, 60,
                            "the project's containers")
        # Only the stats calls: a held list call (the sampler between two sweeps) would never reach one.
        relay.hold(b"/stats")
        wait_until(lambda: next((r for r in relay.held if b"/stats" in r.split(b"\r\n", 1)[0]), None),
                             30, "the sampler thread inside a stats call, its request held")
        held_since = time.time()
        result: list = []
        caller = threading.Thread(target=lambda: result.append(monitor.sample()), daemon=True)
        caller.start()
        caller.join(60)  # a hang detector, not a speed limit: the held call never answers by itself
        assert result, "sample() waited for the Docker engine"
        cached = {c.name: c for c in result[0].containers}
        assert cached.keys() == {BUSY, IDLE}
        assert all(c.at is not None and c.at <= held_since and c.at >= before[c.name].at for c in cached.values())
        assert result[0].at - cached[BUSY].at > 0, "each container's figures carry their age"
        relay.release()
        wait_until(lambda: (all(c.at > held_since for c in monitor.sample().containers)
                            and len(monitor.sample().containers) == 2),
                   60, "fresh figures once the engine answers again")
    finally:
        relay.close()


def test_without_a_docker_url_no_docker_call_is_made(containers, tmp_path):
    """The engine runs and its socket is right here: without EDGEFLEET_DOCKER_URL nothing asks it."""
    assert SOCKET.exists()
    threads = set(threading.enumerate())
    monitor = ResourceMonitor("edge-r", tmp_path)
    monitor.start()
    try:
        sample = monitor.sample()
        assert sample.containers == [] and sample.memory_used_bytes > 0
        assert monitor.docker is None and monitor.docker_errors == 0
        assert not [t for t in set(threading.enumerate()) - threads if t.name == "docker-sampler"]
    finally:
        monitor.stop()


def test_an_unusable_docker_url_is_logged_and_counted_and_sampling_goes_on(tmp_path, monitors, caplog):
    monitor = monitors(docker_url=f"unix://{tmp_path}/no-such.sock", docker_project="*")
    wait_until(lambda: monitor.docker_errors >= 2, 60, "failed Docker calls counted")
    sample = monitor.sample()
    assert sample.containers == [] and sample.memory_used_bytes > 0
    unusable = [r for r in caplog.records if r.getMessage().startswith("docker stats unavailable")]
    assert len(unusable) == 1, "one line when Docker turns unusable, not one per attempt"


def test_a_container_finds_its_own_compose_project(containers, engine):
    """Where telemetry runs in a compose container, it reports that project's containers by default:
    the id comes from the container's own /proc/self/mountinfo, the project from its label."""
    mountinfo = _docker("exec", BUSY, "cat", "/proc/self/mountinfo")
    assert own_project(engine, mountinfo) == PROJECT
    assert own_project(engine, Path("/proc/self/mountinfo").read_text()) is None  # this test runs in no container


def test_telemetry_forwards_its_projects_containers_and_counts_an_unusable_engine(containers, uplink):
    """The service wiring, end to end: resource samples with the project's containers reach S3; started
    again with a Docker URL that leads nowhere, it counts the errors in its status and keeps forwarding."""
    uplink.start_ingest()
    telemetry = uplink.start_telemetry(docker_url=DOCKER_URL, docker_project=PROJECT, resource_interval_s="0.5")

    def reported() -> set[str]:
        names = set()
        for key in uplink.objects("telemetry/metric/"):
            body = gzip.decompress(uplink.store.get_object(Bucket="edgefleet-telemetry", Key=key)["Body"].read())
            names |= {c["name"] for line in body.splitlines() for c in json.loads(line)["body"]["containers"]}
        return names

    wait_until(lambda: reported() == {BUSY, IDLE}, 90, "the project's containers in S3")
    assert telemetry.terminate() == 0
    acknowledged = uplink.telemetry_stats().records_acknowledged
    telemetry = uplink.start_telemetry(docker_url=f"unix://{uplink.tmp}/no-such.sock", resource_interval_s="0.5")
    wait_until(lambda: (s := uplink.telemetry_stats()).docker_errors > 0 and s.records_acknowledged > 0, 60,
               "Docker errors counted in the status while records keep being acknowledged")
    assert "docker stats unavailable" in telemetry.log()
    assert telemetry.terminate() == 0 and acknowledged > 0


def test_the_docker_socket_is_opt_in_in_compose():
    """docker-compose.yml gives telemetry no Docker socket; docker-compose.docker-stats.yml opts in."""
    telemetry = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["telemetry"]
    assert not [v for v in telemetry.get("volumes", []) if "docker.sock" in str(v)]
    assert "EDGEFLEET_DOCKER_URL" not in telemetry.get("environment", {})
    override = yaml.safe_load((REPO / "docker-compose.docker-stats.yml").read_text())["services"]["telemetry"]
    assert override["environment"]["EDGEFLEET_DOCKER_URL"] == DOCKER_URL
    assert f"{SOCKET}:{SOCKET}:ro" in override["volumes"]
