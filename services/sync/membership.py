"""What a rollout message means for this device: whether it is for this device, what it asks for, and
whether it ends the one in progress. Membership is deterministic: a hash of rollout id and device id,
so the same canary share picks the same devices on every device, on every retry and after every
restart, without any device knowing the others."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Protocol

from shared.schemas import ModelRef, RolloutPacing, RolloutPhase, RolloutTarget


class Targeted(Protocol):
    """What membership reads of a rollout: a model's Rollout and a plugin's PluginRollout both have it."""

    @property
    def rollout_id(self) -> str: ...

    @property
    def phase(self) -> RolloutPhase: ...

    @property
    def target(self) -> RolloutTarget: ...

    @property
    def artifact(self) -> tuple[str, int]: ...

    @property
    def pacing(self) -> RolloutPacing | None: ...


def position(rollout_id: str, device_id: str) -> float:
    """This device's place in [0, 1) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_member(rollout: Targeted, device_id: str, groups: list[str]) -> bool:
    """Whether this device is in the rollout's target (devices, groups) and, unless promoted, its canary:
    the devices the rollout names (target.canary_devices), or else its share."""
    target = rollout.target
    if target.devices and device_id not in target.devices:
        return False
    if target.groups and not set(target.groups) & set(groups):
        return False
    if rollout.phase is RolloutPhase.PROMOTED:
        return True
    if target.canary_devices:
        return device_id in target.canary_devices
    return position(rollout.rollout_id, device_id) < target.share


def start_delay(rollout: Targeted, device_id: str) -> float:
    """How long this device waits before it fetches the rollout's manifest: its position() times the
    rollout's spread (0 without pacing). The devices of a fleet so spread their downloads evenly over
    [0, spread_s), each always at the same point of the ramp (a retry or restart waits as long again)."""
    if rollout.pacing is None:
        return 0.0
    return position(rollout.rollout_id, device_id) * rollout.pacing.spread_s


def ranked(rollout_id: str, devices: Iterable[str]) -> list[str]:
    """Devices in the order a share takes them: by position() (a share s is the devices below s), ties by id."""
    return sorted(set(devices), key=lambda device: (position(rollout_id, device), device))


def canary_size(share: float, devices: int) -> int:
    """How many of `devices` a canary of `share` (0 < share <= 1) names: share of them rounded up, so at
    least one whenever there is any device, and never more than there are."""
    # The epsilon keeps 0.07 * 100 (7.000000000000001) at 7.
    return min(devices, max(1, math.ceil(share * devices - 1e-9))) if devices else 0


def supersedes(new: Targeted | None, current: Targeted) -> bool:
    """Whether `new` ends `current`: another name or version, or an abort (a promote does not, so a
    promote never skips a canary)."""
    if new is None:
        return False
    return new.artifact != current.artifact or (
        (new.phase is RolloutPhase.ABORTED) != (current.phase is RolloutPhase.ABORTED)
    )


def requested(rollout: Targeted) -> ModelRef:
    """What a rollout asks for, before its manifest is known (SHA-256 not yet known)."""
    name, version = rollout.artifact
    return ModelRef(name=name, version=version, sha256="")
