"""The benches' containers: the project's images built with scripts/images.sh, containers run on the
host network under a name the bench owns (efh-bench-...), their health, CPU and memory read from the
engine and their cgroups, and every one removed with its anonymous volumes when the bench ends.

The Docker command line is used, not a client library: it is what the tests and users run, and the
benches need nothing it does not give.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from shared.config import environment

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "efh-bench"
STANDIN_LABEL = "io.edgefleet.standin"  # scripts/images.sh labels the images it makes in place of public ones


def engine_missing() -> str | None:
    """None when a Docker engine answers; otherwise why not, in words a row of a table can carry."""
    if shutil.which("docker") is None:
        return "no Docker engine: the docker command is not installed"
    result = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        return f"no Docker engine: {said[-1] if said else 'docker version failed'}"
    return None


def build_images(*targets: str) -> float:
    """Runs scripts/images.sh (it makes missing stand-ins; docker build is cached) for the given
    Dockerfile targets (default: every service); returns its seconds.

    Raises:
        subprocess.CalledProcessError: a build failed (its output went to the terminal).
    """
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / "scripts" / "images.sh"), *targets], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def inspect_image(tag: str) -> dict | None:
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True)
    return json.loads(result.stdout)[0] if result.returncode == 0 else None


@dataclass
class Container:
    name: str
    id: str

    def state(self) -> tuple[str, str]:
        """(State.Status, State.Health.Status or '' where the image has no health check)."""
        template = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
        inspected = subprocess.run(["docker", "inspect", "-f", template, self.id], capture_output=True, text=True)
        out = inspected.stdout.split()
        return (out[0] if out else "gone"), (out[1] if len(out) > 1 else "")

    def logs(self, tail: int = 40) -> str:
        result = subprocess.run(["docker", "logs", "--tail", str(tail), self.id], capture_output=True, text=True)
        return result.stdout + result.stderr

    def cgroup(self, controller: str, name: str) -> Path | None:
        """A cgroup file of this container: v1 (cgroupfs or systemd driver) or v2."""
        for path in (
            Path("/sys/fs/cgroup", controller, "docker", self.id, name),
            Path("/sys/fs/cgroup", controller, "system.slice", f"docker-{self.id}.scope", name),
            Path("/sys/fs/cgroup/system.slice", f"docker-{self.id}.scope", name),
            Path("/sys/fs/cgroup/docker", self.id, name),
        ):
            if path.exists():
                return path
        return None

    def resident_bytes(self) -> tuple[int, str]:
        """Resident memory: the cgroup's anonymous memory (rss on v1, anon on v2: page cache left out, as
        it is reclaimable), or where the cgroup is not visible, `docker stats` MemUsage (usage less
        inactive page cache). Returns (bytes, which of the two)."""
        for controller, key in (("memory", "total_rss"), ("", "anon")):
            path = self.cgroup(controller, "memory.stat")
            if path is not None:
                stats = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
                if key in stats:
                    return int(stats[key]), f"cgroup memory.stat {key}"
        out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", self.id],
                             capture_output=True, text=True).stdout
        return _bytes(out.split("/")[0]), "docker stats MemUsage"

    def cpu_seconds(self) -> float | None:
        """CPU time the container has used (cpuacct on v1, cpu.stat usage_usec on v2); None if not visible."""
        path = self.cgroup("cpuacct", "cpuacct.usage")
        if path is not None:
            return int(path.read_text()) / 1e9
        path = self.cgroup("", "cpu.stat")
        if path is not None:
            stats = dict(line.split() for line in path.read_text().splitlines())
            return int(stats["usage_usec"]) / 1e6
        return None

    def throttled(self) -> int | None:
        """Periods in which the CFS quota (--cpus) stopped the container; None if not visible."""
        path = self.cgroup("cpu", "cpu.stat") or self.cgroup("", "cpu.stat")
        if path is None:
            return None
        return int(dict(line.split() for line in path.read_text().splitlines()).get("nr_throttled", 0))


def run(stack: ExitStack, image: str, role: str, settings: BaseModel, *, args: list[str] = (),
        docker_args: list[str] = ()) -> Container:
    """`docker run -d --network host` of `image` named efh-bench-<role>-<random>, removed (with its
    anonymous volumes) when `stack` closes.

    Args:
        stack: removes the container when it closes.
        image: the image to run.
        role: the middle of the container's name.
        settings: the service's typed settings, given as `-e` variables (`shared.config.environment`,
            the processes' way too): the keys set on them, those `config.load` read from the bench's
            own EDGEFLEET_* environment included; the image's defaults hold for the rest.
        args: the command after the image (default: the image's).
        docker_args: more `docker run` flags (volumes, --cpus ...).

    Returns:
        The started container.

    Raises:
        RuntimeError: docker run failed (with its message).
    """
    name = f"{PREFIX}-{role}-{uuid.uuid4().hex[:8]}"
    command = ["docker", "run", "-d", "--name", name, "--network", "host", *docker_args]
    variables = environment(settings)
    for key in variables:  # `-e NAME` takes the value from docker's own environment: no secret in `ps`
        command += ["-e", key]
    result = subprocess.run([*command, image, *args], capture_output=True, text=True,
                            env={**os.environ, **variables})
    # Registered before the check: a container that was created but failed to start is removed too.
    stack.callback(subprocess.run, ["docker", "rm", "-fv", name], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"docker run {image} failed: {result.stderr.strip()}")
    return Container(name, result.stdout.strip())


def wait_healthy(container: Container, timeout: float, poll_s: float = 0.2) -> float:
    """Polls the container's health every poll_s; returns the perf_counter time it was first seen healthy.

    Raises:
        RuntimeError: the container exited, or was not healthy within timeout (with its last log lines).
    """
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        status, health = container.state()
        if health == "healthy":
            return time.perf_counter()
        if status not in ("created", "running"):
            raise RuntimeError(f"{container.name} {status} before it was healthy:\n{container.logs()}")
        time.sleep(poll_s)
    raise RuntimeError(f"{container.name} not healthy within {timeout:g} s:\n{container.logs()}")


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def _bytes(text: str) -> int:
    match = re.match(r"\s*([\d.]+)\s*([a-zA-Z]+)", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
