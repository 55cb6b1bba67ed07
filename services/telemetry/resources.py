"""Host resources through psutil, and per-container figures through the Docker API where the Docker
socket is mounted (docker-compose); elsewhere (k3s, bare processes) the host figures stand alone."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil

from shared.logs import fields
from shared.schemas import ContainerSample, ResourceSample

log = logging.getLogger(__name__)

DOCKER_SOCKET = Path("/var/run/docker.sock")


class ResourceMonitor:
    def __init__(self, device: str, disk_path: Path) -> None:
        self.device, self.disk_path = device, disk_path
        psutil.cpu_percent(None)  # the first call only starts the measurement
        self._docker = _docker_client()

    def sample(self, queue_bytes: int = 0, queue_records: int = 0) -> ResourceSample:
        memory = psutil.virtual_memory()
        return ResourceSample(
            device=self.device,
            cpu_percent=psutil.cpu_percent(None),
            memory_percent=memory.percent,
            memory_used_bytes=memory.used,
            disk_percent=psutil.disk_usage(str(self.disk_path)).percent,
            temperatures_c=_temperatures(),
            containers=self._containers(),
            queue_bytes=queue_bytes,
            queue_records=queue_records,
            at=time.time(),
        )

    def _containers(self) -> list[ContainerSample]:
        if self._docker is None:
            return []
        samples = []
        try:
            for container in self._docker.containers.list():
                stats = container.stats(stream=False)
                cpu = stats["cpu_stats"]["cpu_usage"]["total_usage"] - stats["precpu_stats"]["cpu_usage"]["total_usage"]
                system = stats["cpu_stats"].get("system_cpu_usage", 0) - stats["precpu_stats"].get("system_cpu_usage", 0)
                cores = stats["cpu_stats"].get("online_cpus", 1)
                samples.append(ContainerSample(
                    name=container.name, cpu_percent=round(100.0 * cpu / system * cores, 2) if system > 0 else 0.0,
                    memory_bytes=int(stats["memory_stats"].get("usage", 0)),
                ))
        except Exception as exc:  # the Docker API going away must not stop telemetry
            log.warning("docker stats unavailable", extra=fields(error=str(exc)))
        return samples


def _temperatures() -> dict[str, float]:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    if read is None:
        return {}
    try:
        return {f"{chip}/{t.label or i}": t.current for chip, entries in read().items() for i, t in enumerate(entries)}
    except OSError:
        return {}


def _docker_client():
    if not DOCKER_SOCKET.exists():
        return None
    try:
        import docker

        return docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
    except Exception as exc:  # the package missing, or a socket we may not use
        log.warning("docker socket present but unusable", extra=fields(error=str(exc)))
        return None
