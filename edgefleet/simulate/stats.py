"""What a simulator process reports about itself, every second, in its --stats file (written atomically):
the bench (edgefleet/bench/fleet.py) reads it."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from shared.atomic import write_atomic


class TelemetrySums(BaseModel):
    """The sums over a process's devices of SimTelemetry.stats()."""

    appended: int = 0
    acked: int = 0
    sent_batches: int = 0
    resent_batches: int = 0
    dead_lettered: int = 0
    queued: int = 0


class RegistryStats(BaseModel):
    """Requests the process's devices made to the registry (S3), by operation, and the bytes of the bodies."""

    requests: dict[str, int] = Field(default_factory=dict)  # e.g. GetObject, HeadObject
    bytes: int = 0


class RolloutStats(BaseModel):
    """Rollout messages the state machines handled, and each device's last reported sync state, counted."""

    handled: int = 0
    states: dict[str, int] = Field(default_factory=dict)  # SyncState value -> devices reporting it last


class LinkStats(BaseModel):
    connects: int = 0  # CONNACKs accepted (the first connect of each device and every reconnect)
    connect_failures: int = 0
    losses: int = 0  # sessions lost without a DISCONNECT of ours (cuts included)
    cut: int = 0  # devices whose link was cut


class SimStats(BaseModel):
    pid: int
    at: float
    devices: int
    connected: int
    all_connected_at: float | None = None  # wall clock when every device had connected once
    rss_bytes: int
    rss_before_devices_bytes: int
    per_device_bytes: int
    link: LinkStats = Field(default_factory=LinkStats)
    telemetry: TelemetrySums = Field(default_factory=TelemetrySums)
    registry: RegistryStats = Field(default_factory=RegistryStats)
    rollouts: RolloutStats = Field(default_factory=RolloutStats)


def write(path: Path, stats: SimStats) -> None:
    """Replaces the stats file: a reader sees the previous second's or this one's, never a part."""
    write_atomic(path, stats.model_dump_json().encode())


def read(path: Path) -> SimStats:
    """A stats file as a simulator wrote it. Raises OSError, pydantic.ValidationError."""
    return SimStats.model_validate_json(path.read_bytes())


class RegistryCounter:
    """Counts a boto3 S3 client's requests by operation and the body bytes of its GetObject answers,
    through botocore's event hooks (thread-safe: the rollout workers share the client).

    :param client: a boto3 S3 client; the counter registers itself on it.
    """

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._bytes = 0
        client.meta.events.register("after-call.s3", self._after_call)

    def _after_call(self, model: Any = None, parsed: Any = None, **_: Any) -> None:
        name = getattr(model, "name", "unknown")
        length = parsed.get("ContentLength", 0) if name == "GetObject" and isinstance(parsed, dict) else 0
        with self._lock:
            self._requests[name] += 1
            self._bytes += int(length or 0)

    def stats(self) -> RegistryStats:
        with self._lock:
            return RegistryStats(requests=dict(self._requests), bytes=self._bytes)
