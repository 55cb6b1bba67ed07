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

    @property
    def issued_at(self) -> float: ...


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


def pacing_position(rollout_id: str, device_id: str) -> float:
    """This device's place in [0, 1) in the rollout's pacing: a hash independent of position(), which
    draws the canary. Were it the same, a drawn canary (the devices below its share) would all start in
    the first share of the spread, and a promote's devices (the rest) never in it."""
    digest = hashlib.sha256(f"pacing\0{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def start_delay(rollout_id: str, device_id: str, pacing: RolloutPacing, issued_at: float, now: float) -> float:
    """How long this device still waits before it fetches a paced rollout's manifest: its turn,
    pacing_position() * spread_s after the rollout (this phase of it) was issued, so the devices of a
    fleet spread their downloads evenly over [0, spread_s), each always at the same point of the ramp.
    A device that restarts, retries or joins late waits only what is left of its turn (none once it is
    past); the turn is clamped to [0, its full length], so a device clock ahead of the operator's starts
    early and one behind waits at most the full turn.

    :param pacing: the rollout's pacing.
    :param issued_at: the rollout's issued_at (the operator's wall clock, time.time()).
    :param now: this device's wall clock (time.time()).
    :returns: seconds to wait, in [0, spread_s).
    """
    turn = pacing_position(rollout_id, device_id) * pacing.spread_s
    return min(turn, max(0.0, turn - (now - issued_at)))


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
