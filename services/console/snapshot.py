"""What the console's page reads: the fleet's state (GET /api/fleet, and every event of /api/events) and the
charts (GET /api/charts). The console's own HTTP API, between service.py and page/console.js: the wire
messages it is made from are shared.schemas'; these are views of them, computed by fleet.py and charts.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Health = Literal["online", "stale"]


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceView(_View):
    device: str
    # stale: no status newer than stale_after_s, or a service's retained status says offline (its last will).
    health: Health
    health_reason: str | None
    age_s: float | None  # since the newest status of any of its services (device clock against the console's)
    services: dict[str, str]  # service -> online | offline
    model: str | None  # "name vN", what inference serves (else what sync last reported serving)
    sync_state: str | None
    sync_reason: str | None
    sync_rollout: str | None
    predictions_per_s: float | None  # from two inference statuses' predictions_published; None: not known
    outbox_records: int | None
    open_alerts: list[str]


class RolloutView(_View):
    kind: Literal["model", "plugin"]
    rollout_id: str
    name: str  # the model's or the plugin's
    version: int
    phase: str
    target_devices: list[str]
    target_groups: list[str]
    share: float
    # The devices a canary targets exactly (RolloutTarget.canary_devices; empty: `share` decides), and the
    # page's line for them while the rollout is a canary: "device-1 (1 of 2 devices)" (None otherwise).
    canary_devices: list[str]
    canary: str | None
    issued_at: float
    states: dict[str, int]  # devices per sync state, of the reports on this rollout
    devices: dict[str, str]  # device -> its state in this rollout


class RollbackView(_View):
    device: str
    rollout_id: str | None
    target: str | None  # the model rolled back from
    serving: str | None  # and the one served again
    reason: str | None
    canary_passed: bool | None
    canary_conclusive: bool | None
    canary_reasons: list[str]
    at: float


class FleetSnapshot(_View):
    now: float
    broker_connected: bool
    stale_after_s: float
    devices: list[DeviceView]
    rollout: RolloutView | None
    plugin_rollouts: list[RolloutView]
    rollbacks: list[RollbackView]  # newest first
    charts_version: int  # changes when /api/charts has new data


class DeviceCharts(_View):
    device: str
    at: list[float]  # the samples' times, oldest first
    scores: dict[str, list[float | None]]  # by drift measure (AlertType), one value per `at`
    latency_p50_ms: list[float | None]
    latency_p95_ms: list[float | None]


class ChartsSnapshot(_View):
    read_at: float | None  # when S3 was last read (None: not yet)
    window_s: float
    devices: list[DeviceCharts]
    error: str | None  # why the last read failed, if it did
    truncated: bool  # the last read stopped at a cap: more objects wait for the next one
