"""Host resources through psutil, and CPU and memory per container of this device through the Docker
Engine API where it is asked for (EDGEFLEET_DOCKER_URL); elsewhere the host figures stand alone.

Docker is opt-in, never "whatever happens to be mounted": whoever can talk to the Docker socket
controls the host (a `:ro` mount only stops the file being replaced, not API calls through it), so a
device runs telemetry without it unless its operator chose to (docker-compose.docker-stats.yml).

A one-shot stats call (`GET /containers/{id}/stats?stream=0`) waits in the daemon for two readings
about a second apart, so that it can fill `precpu_stats`: a device with six containers would hold
telemetry's commit loop for six seconds or more. So the containers are read by a sampler thread of
their own and ResourceMonitor.sample() hands out the last figures at once, each with the time Docker
read it (the same split as Telegraf's and cAdvisor's docker inputs: gather on one clock, report on
another). The figures are computed as the Docker CLI's `docker stats` computes them
(docker/cli, cli/command/container/stats_helpers.go), so they match what an operator sees there.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from shared.logs import fields
from shared.metrics import Counter
from shared.schemas import ContainerSample, ResourceSample

if TYPE_CHECKING:  # imported where it is used: a device without Docker stats never loads it
    import docker

log = logging.getLogger(__name__)

PROJECT_LABEL = "com.docker.compose.project"  # set by docker compose (v1 and v2) on every container it makes
ALL_PROJECTS = "*"
# Containers read per sweep; a device runs a handful. Beyond this they are left out and it is logged.
MAX_CONTAINERS = 64
# A Docker call that has not answered by then fails (and is counted); the thread then tries again.
DOCKER_TIMEOUT_S = 30.0
# Figures older than this many resource intervals (or DOCKER_TIMEOUT_S, whichever is longer) are no
# longer reported: a container that vanished, or an engine that stopped answering, is not "still at 3 %".
STALE_INTERVALS = 3
# Docker bind-mounts /etc/hostname, /etc/hosts and /etc/resolv.conf from its containers/<id>/ folder
# into every container, whatever its network mode and cgroup version: the surest way to learn our id.
_OWN_ID = re.compile(r"/containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)\s")


class ResourceMonitor:
    """Host figures read on each sample(); container figures from a DockerSampler, if docker_url is set.

    The owner (the telemetry service) calls start() before its loop and stop() after it.
    """

    def __init__(self, device: str, disk_path: Path, docker_url: str = "", docker_project: str = "",
                 interval_s: float = 10.0) -> None:
        """
        :param docker_url: the Docker Engine API (unix:///var/run/docker.sock); empty: no Docker call ever.
        :param docker_project: the compose project whose containers are reported ("" = our own, "*" = all).
        :param interval_s: the least time between two sweeps of the containers.
        """
        self.device, self.disk_path = device, disk_path
        psutil.cpu_percent(None)  # the first call only starts the measurement
        self.docker = DockerSampler(docker_url, docker_project, interval_s) if docker_url else None

    def start(self) -> None:
        if self.docker is not None:
            self.docker.start()

    def stop(self) -> None:
        if self.docker is not None:
            self.docker.stop()

    @property
    def docker_errors(self) -> int:
        return self.docker.errors.value if self.docker is not None else 0

    def sample(self, queue_bytes: int = 0, queue_records: int = 0) -> ResourceSample:
        """Never waits for Docker: the containers are the sampler's last figures, each with its own `at`."""
        memory = psutil.virtual_memory()
        return ResourceSample(
            device=self.device,
            cpu_percent=psutil.cpu_percent(None),
            memory_percent=memory.percent,
            memory_used_bytes=memory.used,
            disk_percent=psutil.disk_usage(str(self.disk_path)).percent,
            temperatures_c=_temperatures(),
            containers=self.docker.latest() if self.docker is not None else [],
            queue_bytes=queue_bytes,
            queue_records=queue_records,
            at=time.time(),
        )


class DockerSampler:
    """A thread that reads the stats of this device's containers, one after another, and keeps the last
    figures of each. It never ends on a Docker error: each failed call is counted (errors), logged when
    Docker turns unusable and when it is back, and tried again on the next sweep."""

    def __init__(self, url: str, project: str, interval_s: float, timeout_s: float = DOCKER_TIMEOUT_S) -> None:
        self.url, self._project_setting, self.interval_s, self.timeout_s = url, project, interval_s, timeout_s
        self.project: str | None = None  # the one reported; None: every container (known once connected)
        self.errors = Counter()
        self.sweeps = Counter()  # sweeps completed
        self._figures: dict[str, ContainerSample] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._failing = False
        # A daemon thread: a Docker call may hang up to timeout_s, and must not hold the process's exit.
        self._thread = threading.Thread(target=self._run, name="docker-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Ends the sweeps; a stats call still in flight is abandoned after timeout_s (the thread holds
        nothing durable, and a hung engine must not hold telemetry's shutdown)."""
        self._stopping.set()
        self._thread.join(timeout_s)

    def latest(self) -> list[ContainerSample]:
        """The last figures of every container seen in the last sweep, unless they are stale."""
        oldest = time.time() - max(STALE_INTERVALS * self.interval_s, self.timeout_s)
        with self._lock:
            fresh = (s for s in self._figures.values() if s.at is not None and s.at >= oldest)
            return sorted(fresh, key=lambda s: s.name)

    def _run(self) -> None:
        api: docker.APIClient | None = None
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                if api is None:
                    api = self._connect()
                self._sweep(api)
                self._recovered()
            except Exception as exc:  # any failure of the engine is counted, never fatal
                self._failed(exc)
                api = None  # connect again: the engine may have restarted with another API version
            self._stopping.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _connect(self) -> docker.APIClient:
        import docker  # imported here: a device without Docker stats never loads it

        api = docker.APIClient(base_url=self.url, timeout=self.timeout_s)  # asks the engine its API version
        if self._project_setting == ALL_PROJECTS:
            self.project = None
        elif self._project_setting:
            self.project = self._project_setting
        else:
            self.project = own_project(api, _read(Path("/proc/self/mountinfo")))
        log.info("docker stats on", extra=fields(url=self.url, project=self.project or ALL_PROJECTS))
        return api

    def _sweep(self, api: docker.APIClient) -> None:
        filters = {"label": f"{PROJECT_LABEL}={self.project}"} if self.project else None
        listed = api.containers(filters=filters)  # running ones only; the engine filters by label
        if len(listed) > MAX_CONTAINERS:
            log.warning("too many containers: reporting the first",
                        extra=fields(listed=len(listed), limit=MAX_CONTAINERS))
            listed = listed[:MAX_CONTAINERS]
        for entry in listed:
            if self._stopping.is_set():
                return
            stats = _stats(api, entry["Id"])
            if stats is None:  # gone between the list and its stats
                continue
            sample = container_sample(_name(entry), stats, time.time())
            with self._lock:
                self._figures[entry["Id"]] = sample
        seen = {entry["Id"] for entry in listed}
        with self._lock:
            self._figures = {cid: s for cid, s in self._figures.items() if cid in seen}
        self.sweeps.add()

    def _failed(self, exc: Exception) -> None:
        self.errors.add()
        if not self._failing:  # one line when it turns unusable, not one per sweep
            self._failing = True
            log.warning("docker stats unavailable: containers left out until it answers; telemetry goes on",
                        extra=fields(url=self.url, error=f"{type(exc).__name__}: {exc}"[:500]))

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("docker stats available again", extra=fields(url=self.url))


def own_project(api: docker.APIClient, mountinfo: str) -> str | None:
    """The compose project of the container this process runs in; None outside a container or compose.

    :param api: a docker.APIClient.
    :param mountinfo: the text of /proc/self/mountinfo.
    :raises docker.errors.DockerException: where the engine cannot say.
    """
    own = own_container_id(mountinfo)
    if own is None:
        return None
    import docker

    try:
        labels = api.inspect_container(own)["Config"].get("Labels") or {}
    except docker.errors.NotFound:  # a container of another engine (docker-in-docker, a remote URL)
        return None
    return labels.get(PROJECT_LABEL) or None


def own_container_id(mountinfo: str) -> str | None:
    """The Docker id of the container whose /proc/self/mountinfo this is; None outside Docker."""
    found = _OWN_ID.search(mountinfo)
    return found.group(1) if found else None


def container_sample(name: str, stats: dict[str, Any], at: float) -> ContainerSample:
    """One container's figures from a stats answer with both cpu_stats and precpu_stats (stream=0)."""
    memory = stats.get("memory_stats") or {}
    limit = memory.get("limit")
    return ContainerSample(name=name, cpu_percent=cpu_percent(stats), memory_bytes=memory_used(memory),
                           memory_limit_bytes=int(limit) if limit else None, at=at)


def cpu_percent(stats: dict[str, Any]) -> float:
    """Percent of one core over the interval between precpu_stats and cpu_stats (Linux engines).

    The container's CPU time over the host's, both in nanoseconds, scaled by the cores online: as the
    Docker CLI does (calculateCPUPercentUnix), counting percpu_usage where online_cpus is missing
    (API < 1.27; cgroup v2 engines report no percpu_usage, but always online_cpus).
    """
    now, before = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    used = (now.get("cpu_usage") or {}).get("total_usage", 0) - (before.get("cpu_usage") or {}).get("total_usage", 0)
    system = now.get("system_cpu_usage", 0) - before.get("system_cpu_usage", 0)
    cores = now.get("online_cpus") or len((now.get("cpu_usage") or {}).get("percpu_usage") or ()) or 1
    if used <= 0 or system <= 0:
        return 0.0
    return round(100.0 * float(used) / float(system) * int(cores), 2)


def memory_used(memory: dict[str, Any]) -> int:
    """Usage less the inactive page cache (the kernel drops it first), as `docker stats` shows it:
    cgroup v1 names it total_inactive_file, cgroup v2 inactive_file (calculateMemUsageUnixNoCache)."""
    usage = int(memory.get("usage", 0))
    stats = memory.get("stats") or {}
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    return usage - int(inactive) if 0 < inactive < usage else usage


def _stats(api: docker.APIClient, container_id: str) -> dict[str, Any] | None:
    """The container's stats with two CPU readings; None if it is gone or no longer running (the engine
    then answers with empty figures, not an error)."""
    import docker

    try:
        stats = api.stats(container_id, stream=False)
    except docker.errors.NotFound:
        return None
    return stats if (stats.get("memory_stats") or {}).get("usage") else None


def _name(entry: dict[str, Any]) -> str:
    names = entry.get("Names") or []
    return str(names[0]).lstrip("/") if names else str(entry["Id"])[:12]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # not Linux
        return ""


def _temperatures() -> dict[str, float]:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    if read is None:
        return {}
    try:
        return {f"{chip}/{t.label or i}": t.current for chip, entries in read().items() for i, t in enumerate(entries)}
    except OSError:
        return {}
