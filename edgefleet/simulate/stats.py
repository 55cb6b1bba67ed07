"""What a simulator process reports about itself, every second, in its --stats file (written atomically):
the bench (edgefleet/bench/fleet.py) reads it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from shared.atomic import write_atomic
from shared.schemas import SyncState


class TelemetrySums(BaseModel):
    """The sums over a process's devices of SimTelemetry.stats() (edgefleet/simulate/telemetry.py)."""

    appended: int = 0
    acked: int = 0
    sent_batches: int = 0
    resent_batches: int = 0
    dead_lettered: int = 0
    queued: int = 0


class RegistryStats(BaseModel):
    """The process's devices' traffic with the registry (S3).

    :ivar requests: attempts by operation (GetObject, HeadObject...), every sending counted: retries and
        failed ones included.
    :ivar errors: failed attempts by kind: the S3 error code (NoSuchKey, SlowDown), "HTTP <status>", or the
        exception when no answer came (ReadTimeoutError, ConnectionClosedError...).
    :ivar bytes: body bytes the devices' downloads fetched (counted as read, not from Content-Length).
    """

    requests: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict)
    bytes: int = 0


class RolloutStats(BaseModel):
    """Rollout messages the state machines handled, and each device's last reported sync state, counted.

    :ivar handled: rollout messages a device's state machine finished with (superseded ones included).
    :ivar states: devices by the sync state they reported last.
    """

    handled: int = 0
    states: dict[SyncState, int] = Field(default_factory=dict)


class LinkStats(BaseModel):
    """The process's links to the fleet broker.

    :ivar connects: CONNACKs accepted (the first connect of each device and every reconnect).
    :ivar connect_failures: connects that failed (refused, TLS, timeouts, anything else).
    :ivar losses: sessions lost without a DISCONNECT of ours, cuts included.
    :ivar cut: devices whose link was cut.
    :ivar refused: publishes refused (the link's queue, bounded like the bridge queue, was full; or paho
        refused): lost as a full bridge queue loses them.
    :ivar queued: publishes waiting now for a link that is down, cut or connecting.
    """

    connects: int = 0
    connect_failures: int = 0
    losses: int = 0
    cut: int = 0
    refused: int = 0
    queued: int = 0


class SimStats(BaseModel):
    """One simulator process, now.

    :ivar pid: the process.
    :ivar at: wall clock of this report.
    :ivar devices: devices it simulates; connected: of them, with a session up now.
    :ivar all_connected_at: wall clock when every device had connected once.
    :ivar rss_bytes: resident memory now (trimmed every second: the steady figure).
    :ivar rss_before_devices_bytes: resident memory before the first device was made (libraries, the
        S3 client, the recording, the seed model).
    :ivar per_device_bytes: (rss_bytes - rss_before_devices_bytes) / devices: steady memory per device.
    :ivar peak_rss_bytes: the highest resident memory so far (VmHWM), which trimming does not lower.
    :ivar per_device_peak_bytes: (peak_rss_bytes - rss_before_devices_bytes) / devices: the goal's figure.
    :ivar state_bytes: what the devices' state folders hold (stores, outboxes; on tmpfs that is memory
        too: the devices' own "flash"), hard-linked files once.
    :ivar per_device_state_bytes: state_bytes / devices.
    :ivar failed: device tasks or rollout workers that ended with an exception (a bug; must stay 0).
    :ivar loop_lag_p99_s: how late the event loop ran its 100 ms tick, p99 (and max): high, the simulator
        itself is what a run measured.
    """

    pid: int
    at: float
    devices: int
    connected: int
    all_connected_at: float | None = None
    rss_bytes: int
    rss_before_devices_bytes: int
    per_device_bytes: int
    peak_rss_bytes: int = 0
    per_device_peak_bytes: int = 0
    state_bytes: int = 0
    per_device_state_bytes: int = 0
    failed: int = 0
    loop_lag_p99_s: float = 0.0  # the event loop's lateness (edgefleet/simulate/loop_lag.py): p99 and max
    loop_lag_max_s: float = 0.0
    link: LinkStats = Field(default_factory=LinkStats)
    telemetry: TelemetrySums = Field(default_factory=TelemetrySums)
    registry: RegistryStats = Field(default_factory=RegistryStats)
    rollouts: RolloutStats = Field(default_factory=RolloutStats)


def write(path: Path, stats: SimStats) -> None:
    """Replaces the stats file: a reader sees the previous second's or this one's, never a part."""
    write_atomic(path, stats.model_dump_json().encode())


def read(path: Path) -> SimStats:
    """A stats file as a simulator wrote it.

    :raises OSError: it cannot be read.
    :raises pydantic.ValidationError: it is not a simulator's stats.
    """
    return SimStats.model_validate_json(path.read_bytes())
