"""What the operators' rollout commands (edgefleet/cli/rollout.py) do: publish the fleet's rollout,
retained, on the fleet broker (a device that is offline gets it when it returns), and read every
device's retained sync state back.

A model has one rollout (topics.rollout()); each plugin has its own beside it (a PluginRollout on
topics.plugin_rollout(name), devices' states on topics.plugin_sync_state). Every function here serves
both: `plugin=None` means the model's, a plugin name that plugin's."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.errors import ToolError
from services.sync import membership
from shared import registry, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import CommonSettings
from shared.manifest import ModelManifest
from shared.mqtt import Handler, MqttLink, content_type_of
from shared.plugin import PluginManifest
from shared.schemas import (
    MAX_SPREAD_S,
    PluginRollout,
    Rollout,
    RolloutPacing,
    RolloutPhase,
    RolloutTarget,
    ServiceState,
    ServiceStatus,
    SyncReport,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from paho.mqtt.client import MQTTMessage

# The model's rollout or a plugin's: the same phases, targets and downgrade rule (shared.schemas).
AnyRollout = Rollout | PluginRollout
# The first release whose devices read Rollout.pacing: a device whose status reports an older one would
# refuse a paced rollout (it refuses unknown fields), so plan_pacing leaves pacing out while one is counted.
# The field came in 0.1.0's development without a version of its own: raise this to the release that
# first ships it (the version of pyproject.toml) once there is one.
PACING_SINCE = "0.1.0"


class NoRollout(ToolError, RuntimeError):
    """The fleet broker holds no rollout to promote or abort."""


class BrokerUnreachable(ToolError, ConnectionError):
    """The fleet broker did not accept the operator's connection in time."""


def _link(settings: CommonSettings) -> MqttLink:
    link = MqttLink(settings, "operator", unique=True)
    link.start()
    if not link.wait_connected(10):
        link.stop()
        raise BrokerUnreachable(f"cannot reach the fleet broker at {settings.mqtt.url}")
    return link


def _rollout_topic(plugin: str | None) -> str:
    """The retained rollout's topic: the model's, or the named plugin's (the name checked: no wildcards)."""
    return topics.rollout() if plugin is None else topics.plugin_rollout(registry.check_name(plugin))


def publish(settings: CommonSettings, rollout: AnyRollout) -> None:
    """Publishes a rollout, retained, on its topic (the model's, or its plugin's)."""
    plugin = rollout.plugin if isinstance(rollout, PluginRollout) else None
    link = _link(settings)
    try:
        link.publish(_rollout_topic(plugin), encode(rollout), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)
    finally:
        link.stop()


def new_rollout_id(model: str, version: int) -> str:
    """A rollout's default id: model, version and a random suffix (a new canary draw every time)."""
    return f"{model}-v{version}-{uuid.uuid4().hex[:6]}"


def start(settings: CommonSettings, model: str, version: int, target: RolloutTarget, allow_downgrade: bool = False,
          rollout_id: str | None = None, plugin: bool = False, pacing: RolloutPacing | None = None) -> AnyRollout:
    """Publishes a new rollout, retained: of a model, or (plugin=True) of the plugin named `model`.

    A plugin's version is not looked up here: the caller checks it is published and signed first
    (edgefleet.publish.signed_plugin), as `edgefleet rollout start --plugin` does.

    :param pacing: how the devices spread their downloads (plan_pacing); None: all start at once.

    :raises ValueError: a name or version that could never be a registry key.
    :raises BrokerUnreachable: the fleet broker is unreachable (a ConnectionError).
    """
    registry.check_name(model)
    registry.check_version(version)
    fields = {
        "rollout_id": rollout_id or new_rollout_id(model, version), "version": version,
        "phase": RolloutPhase.CANARY if target.share < 1 or target.canary_devices else RolloutPhase.PROMOTED,
        "target": target,
        "allow_downgrade": allow_downgrade, "issued_at": time.time(), "pacing": pacing,
    }
    rollout = PluginRollout(plugin=model, **fields) if plugin else Rollout(model=model, **fields)
    publish(settings, rollout)
    return rollout


class CanaryRefused(ToolError, ValueError):
    """A canary that cannot be what the operator asked for: more devices than the fleet has, or named
    devices where the CLI cannot know which devices the target holds."""


@dataclass(frozen=True)
class CanaryPlan:
    """Who installs a rollout first, as the operator sees it before it starts.

    target: the rollout's target, its canary_devices filled in where the CLI chose them.
    line: one line for the operator, e.g. "canary: 1 of 2 devices (device-1)".
    """

    target: RolloutTarget
    line: str


def plan_canary(rollout_id: str, target: RolloutTarget, known: list[str], count: int | None = None,
                let_devices_draw: bool = False) -> CanaryPlan:
    """Names the canary's devices (pure: no I/O), so a small fleet gets an exact count: `count` devices,
    or the target's share of them rounded up (at least one). They are ranked by the devices' own hash
    (services.sync.membership.position), so a share names the devices it would have drawn anyway.

    :param rollout_id: the rollout's id (the hash's other half).
    :param target: what the operator asked for: devices or groups, and a share (1: everybody at once).
    :param known: the fleet's devices the CLI knows (online, with a fresh retained sync status).
    :param count: --canary-devices: exactly this many devices go first.
    :param let_devices_draw: a share of a fleet the CLI knows no device of is left to each device's own
        draw (with groups it always is); otherwise it is refused.
    :returns: the target with canary_devices set where the devices could be named, and the plan's line.
    :raises CanaryRefused: `count` with groups (a device's groups are its own setting: the CLI cannot
        name their members) or with more devices than the target holds; a share of the whole fleet when
        no device is known and not let_devices_draw (each device's draw may make a canary of none or
        all of a small fleet).
    """
    candidates = list(target.devices) or ([] if target.groups else known)
    whole = f"group {', '.join(target.groups)}" if target.groups else f"{len(candidates)} devices"
    if count is None and target.share >= 1:
        return CanaryPlan(target, f"no canary: all of {whole if candidates or target.groups else 'the devices'}")
    if count is not None and target.groups:
        raise CanaryRefused("--canary-devices names devices, and which devices a group holds is each device's own "
                            "setting: use --canary PERCENT with --group, or --devices a,b with --canary-devices")
    if not candidates:
        if count is not None:
            raise CanaryRefused("no device has a fresh online status on the fleet broker, so none can be named: "
                                "start the devices first, or list them with --devices")
        if not (target.groups or let_devices_draw):
            raise CanaryRefused(
                f"a {target.share:.0%} canary, but no device has a fresh online status on the fleet broker, so none "
                "can be counted or named, and devices drawing the share by themselves may make a canary of none or "
                "all of a small fleet: start the devices (or wait until their sync reports online) and run it again, "
                "name them with --devices a,b, or pass --let-devices-draw to leave the draw to each device")
        where = whole if target.groups else "the devices (none has a fresh status on the fleet broker yet)"
        return CanaryPlan(target, f"canary: {target.share:.0%} of {where}, each device deciding by itself")
    if count is not None and count > len(candidates):
        raise CanaryRefused(f"--canary-devices {count}: the target holds only {len(candidates)} devices "
                            f"({', '.join(sorted(candidates))})")
    size = count if count is not None else membership.canary_size(target.share, len(candidates))
    chosen = membership.ranked(rollout_id, candidates)[:size]
    share = size / len(candidates) if count is not None else target.share
    named = target.model_copy(update={"canary_devices": chosen, "share": share})
    return CanaryPlan(named, f"canary: {size} of {len(candidates)} devices ({', '.join(chosen)})")


@dataclass(frozen=True)
class PacingPlan:
    """How a rollout's downloads are spread, as the operator sees it before it is published.

    pacing: the rollout's pacing field (None: every device starts at once).
    line: one line for the operator, e.g. "pacing: 950 devices' downloads spread over 19 s (...)".
    """

    pacing: RolloutPacing | None
    line: str


def plan_pacing(targeted: int, artifact_bytes: int, max_concurrent: int, device_bytes_s: float,
                too_old: Sequence[str] = ()) -> PacingPlan:
    """Sizes a rollout's spread (pure: no I/O) so that about `max_concurrent` devices download at once:
    spread_s = targeted * per-device download time / max_concurrent, the per-device time being
    artifact_bytes / device_bytes_s but at least 1 s (a request's round trips and verification).
    No pacing when `targeted` fits in `max_concurrent` (a small fleet: no field a device older than it
    would refuse), when max_concurrent is 0, or when a counted device runs a release older than the
    field (`too_old`: it would refuse a paced rollout). The spread is capped at MAX_SPREAD_S; the line
    then says how many download at once in fact.

    :param targeted: how many devices this phase sets downloading (targeted_at_start, targeted_at_promote).
    :param artifact_bytes: the model's (or plugin's) size from its manifest.
    :param max_concurrent: --max-concurrent-downloads (0: no pacing).
    :param device_bytes_s: --device-download-bytes-s, a device's download rate (> 0).
    :param too_old: the counted devices whose status reports an edgefleet older than PACING_SINCE.
    """
    if max_concurrent <= 0:
        return PacingPlan(None, "pacing: none (--max-concurrent-downloads 0): every device starts at once")
    if targeted == 0:
        return PacingPlan(None, "pacing: none (no device counted: none online in the target, or all had it "
                                "at once): every device that takes the rollout starts at once")
    if targeted <= max_concurrent:
        return PacingPlan(None, f"pacing: none ({targeted} devices to download, at most {max_concurrent} at once)")
    if too_old:
        named = ", ".join(sorted(too_old)[:5]) + (", ..." if len(too_old) > 5 else "")
        return PacingPlan(None, f"pacing: none ({len(too_old)} of the {targeted} devices run edgefleet older than "
                                f"{PACING_SINCE}, which refuses a paced rollout: {named}): every device starts at once")
    per_device_s = max(1.0, artifact_bytes / device_bytes_s)
    wanted = targeted * per_device_s / max_concurrent
    spread = min(wanted, MAX_SPREAD_S)
    at_once = f"about {max_concurrent} at once"
    if wanted > spread:
        at_once = (f"capped from {wanted:.0f} s: about {targeted * per_device_s / spread:.0f} at once, "
                   f"not {max_concurrent}")
    return PacingPlan(RolloutPacing(spread_s=round(spread, 3), max_concurrent=max_concurrent),
                      f"pacing: {targeted} devices' downloads spread over {spread:.0f} s ({at_once}, "
                      f"{per_device_s:.1f} s each at {device_bytes_s:g} bytes/s)")


def too_old_for_pacing(devices: Iterable[str], versions: dict[str, str]) -> list[str]:
    """The devices whose sync status reports an edgefleet release older than PACING_SINCE (or one that
    names no release: fail closed). A device with no status heard is not counted (it is offline, and
    gets the retained rollout when it returns).

    :param devices: the devices a phase sets downloading.
    :param versions: online_versions().
    """
    since = _release(PACING_SINCE)
    return [d for d in devices if d in versions and _release(versions[d]) < since]


def _release(version: str) -> tuple[int, ...]:
    """A version's release numbers: "0.2.0+abc" is (0, 2, 0); one naming none ("test") is ()."""
    numbers = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def targeted_at_start(target: RolloutTarget, known: list[str]) -> int:
    """How many devices a new rollout sets downloading: its named canary, else its share of the listed
    devices or of the `known` ones (for a group, all known devices: an upper bound, as the CLI cannot
    tell a group's members)."""
    if target.canary_devices:
        return len(target.canary_devices)
    candidates = len(target.devices) or len(known)
    return candidates if target.share >= 1 else membership.canary_size(target.share, candidates)


def targeted_at_promote(rollout: AnyRollout, known: list[str]) -> int:
    """How many devices a promote sets downloading: promoted_devices()."""
    return len(promoted_devices(rollout, known))


def promoted_devices(rollout: AnyRollout, known: list[str]) -> list[str]:
    """The devices a promote sets downloading: the target's devices (listed, else the `known` ones) that
    are not in its canary (named, or drawn by share)."""
    target = rollout.target
    candidates = target.devices or known
    canary = set(target.canary_devices) or {
        d for d in candidates if membership.position(rollout.rollout_id, d) < target.share}
    return [d for d in candidates if d not in canary]


def artifact_bytes(s3: S3Client, bucket: str, rollout: AnyRollout) -> int:
    """The size of what a rollout downloads, from its manifest in the registry. Read, not verified: it
    only sizes the pacing (every device verifies the signature before it downloads anything).

    :raises ClientError, BotoCoreError: the registry cannot be read.
    :raises ValueError: a bad name, or no manifest (too large, or not one).
    """
    plugin = isinstance(rollout, PluginRollout)
    name, version = rollout.artifact
    key = (registry.plugin_key if plugin else registry.key)(name, version, registry.MANIFEST_OBJECT)
    document = registry.read_bounded(s3, bucket, key, registry.MAX_MANIFEST_BYTES)
    return (PluginManifest if plugin else ModelManifest).model_validate_json(document).size_bytes


def known_devices(settings: CommonSettings, wait_s: float = 2.0) -> list[str]:
    """The devices a canary may name: those whose retained sync status on the fleet broker says online
    and is fresh (not stale: a device that stopped without its last will is no canary)."""
    return list(online_versions(settings, wait_s))


def online_versions(settings: CommonSettings, wait_s: float = 2.0) -> dict[str, str]:
    """known_devices(), each with the edgefleet release its sync status reports (edgefleet_version)."""
    return {r.device: r.status.edgefleet_version for r in rows(settings, wait_s)
            if r.status is not None and r.status.state is ServiceState.ONLINE and not r.stale}


def current(settings: CommonSettings, wait_s: float = 2.0, plugin: str | None = None) -> AnyRollout:
    """The retained rollout of the model, or of the named plugin.

    :raises NoRollout: none is retained (or it cannot be decoded).
    :raises ValueError: an invalid plugin name.
    """
    kind: type[AnyRollout] = Rollout if plugin is None else PluginRollout
    topic = _rollout_topic(plugin)
    found: list[AnyRollout] = []
    got = threading.Event()

    def on_rollout(message: MQTTMessage) -> None:
        if message.payload:
            try:
                found.append(decode(kind, message.payload, content_type_of(message)))
            except DecodeError:
                pass
        got.set()

    link = MqttLink(settings, "operator", unique=True)
    link.subscribe(topic, on_rollout)
    link.start()
    try:
        got.wait(wait_s)
    finally:
        link.stop()
    if not found:
        raise NoRollout("no rollout is retained on the fleet broker" if plugin is None
                        else f"no rollout of the plugin {plugin} is retained on the fleet broker")
    return found[-1]


def change_phase(settings: CommonSettings, phase: RolloutPhase, plugin: str | None = None,
                 rollout: AnyRollout | None = None, pacing: RolloutPacing | None = None) -> AnyRollout:
    """Republishes the retained rollout (the model's, or the named plugin's) in another phase.

    :param rollout: the retained rollout, when the caller has read it already (current()).
    :param pacing: the new phase's pacing (plan_pacing); None: every device acts at once (an abort).
    """
    rollout = rollout or current(settings, plugin=plugin)
    changed = type(rollout)(**{**rollout.model_dump(), "phase": phase, "issued_at": time.time(), "pacing": pacing})
    publish(settings, changed)
    return changed


# A timestamp this far ahead of the operator's clock is a skewed device clock, not NTP jitter.
CLOCK_AHEAD_TOLERANCE_S = 2.0
# A device silent for this many status intervals is stale. Like Mosquitto, which gives a client 1.5
# keep-alives before calling it gone, the margin tolerates a late refresh; three intervals also
# tolerate two lost ones before an operator is told to distrust the row.
STALE_AFTER_INTERVALS = 3


@dataclass(frozen=True)
class DeviceRow:
    """One device as the operators see it. `device` is the <device> level of the topic, which the fleet
    broker's ACL ties to the device's certificate; the payload's own `device` field is only a claim.

    age_s: now - report.at (negative when the device's clock is ahead). last_heard_s: now - the newest
    trustworthy timestamp of its sync report and sync status. stale: nothing heard for more than
    STALE_AFTER_INTERVALS status intervals (or only timestamps from the future, which prove nothing).
    """

    device: str
    report: SyncReport | None
    status: ServiceStatus | None
    age_s: float | None
    last_heard_s: float | None
    stale: bool
    clock_ahead: bool

    @property
    def claimed_device(self) -> str | None:
        """The payload's device field, when it names another device than its topic."""
        for claim in (self.report and self.report.device, self.status and self.status.device):
            if claim and claim != self.device:
                return claim
        return None

    def as_json(self) -> dict[str, Any]:
        """The report's fields, with `device` from the topic and the freshness added."""
        body = self.report.model_dump(mode="json") if self.report else {f: None for f in SyncReport.model_fields}
        return {
            **body, "device": self.device, "claimed_device": self.claimed_device,
            "sync": self.status.state.value if self.status else None,
            "age_s": _rounded(self.age_s), "last_heard_s": _rounded(self.last_heard_s),
            "stale": self.stale, "clock_ahead": self.clock_ahead,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def row(device: str, report: SyncReport | None, status: ServiceStatus | None, now: float,
        status_interval_s: float) -> DeviceRow:
    """Judges one device's freshness from its retained sync report and sync status (pure: no I/O).

    :param now: the operator's clock (time.time()).
    :param status_interval_s: how often devices refresh their status; stale after 3 of them.
    """
    ages = [now - m.at for m in (report, status) if m is not None]
    clock_ahead = any(age < -CLOCK_AHEAD_TOLERANCE_S for age in ages)
    trusted = [max(age, 0.0) for age in ages if age >= -CLOCK_AHEAD_TOLERANCE_S]
    last_heard = min(trusted) if trusted else None
    stale = last_heard is None or last_heard > STALE_AFTER_INTERVALS * status_interval_s
    return DeviceRow(device, report, status, now - report.at if report else None, last_heard, stale, clock_ahead)


def rows(settings: CommonSettings, wait_s: float = 2.0, now: float | None = None,
         plugin: str | None = None) -> list[DeviceRow]:
    """Every device that has a retained sync report (on the model's rollout, or the named plugin's) or a
    sync status on the fleet broker, by topic, sorted."""
    reports, statuses, _ = _collect(settings, wait_s, plugin)
    now = time.time() if now is None else now
    return [row(d, reports.get(d), statuses.get(d), now, settings.status_interval_s)
            for d in sorted(reports.keys() | statuses.keys())]


def states(settings: CommonSettings, wait_s: float = 2.0, plugin: str | None = None) -> dict[str, SyncReport]:
    """Every device's latest retained sync report (the model's, or the named plugin's), by the device its
    topic names."""
    return _collect(settings, wait_s, plugin)[0]


# How long the retained read goes on after the broker's marker SUBACK (_retained_sent): the messages it
# wrote before it are in the socket or paho's buffer, not yet through the handlers.
RETAINED_GRACE_S = 0.2
# MQTT's largest Receive Maximum. Mosquitto sends a client no more unacknowledged QoS 1 messages than
# this (its default, max_inflight_messages, is 20) and holds the rest back until PUBACKs come in, so
# with its default the marker's SUBACK would overtake all but the first 20 retained messages.
# (mosquitto v2.0.11 fcf14eaf: src/context.c:87 the default; src/property_broker.c:40-46 a CONNECT's
# Receive Maximum replaces it; src/database.c:77-78 and 464-466 a message past it is queued, unsent.)
RECEIVE_MAXIMUM = 65535


def _collect(settings: CommonSettings, wait_s: float, plugin: str | None = None
             ) -> tuple[dict[str, SyncReport], dict[str, ServiceStatus], bool]:
    """Reads every device's retained sync report and sync status.

    :param wait_s: the most seconds the read takes; less when the broker marks its retained messages sent.
    :returns: the reports and statuses by device, and whether the broker's marker ended the read (False:
        wait_s ran out first, as with a broker that orders its answers otherwise).
    """
    deadline = time.monotonic() + wait_s
    states_topic = topics.all_sync_states() if plugin is None else topics.all_plugin_sync_states(
        registry.check_name(plugin))
    reports: dict[str, SyncReport] = {}
    statuses: dict[str, ServiceStatus] = {}

    def keep(kind: type[SyncReport] | type[ServiceStatus], into: dict[str, Any]) -> Handler:
        def on_message(message: MQTTMessage) -> None:
            try:
                # Keyed by the topic: a device may publish only under its own id (fleet ACL), but it can
                # write anything in a payload.
                into[topics.check_id("device", topics.device_of(message.topic))] = decode(
                    kind, message.payload, content_type_of(message))
            except (DecodeError, ValueError, IndexError):
                return
        return on_message

    link = MqttLink(settings, "operator", unique=True, receive_maximum=RECEIVE_MAXIMUM)
    link.subscribe(states_topic, keep(SyncReport, reports))
    link.subscribe(topics.every_device_status(topics.SYNC_SERVICE), keep(ServiceStatus, statuses))
    link.start()
    try:
        marked = _retained_sent(link, deadline)
        time.sleep(max(0.0, min(RETAINED_GRACE_S if marked else wait_s, deadline - time.monotonic())))
    finally:
        link.stop()
    return dict(reports), dict(statuses), marked


def _retained_sent(link: MqttLink, deadline: float) -> bool:
    """Waits (until `deadline`, time.monotonic()) until the broker has written every retained message of
    the link's subscriptions: True then, False if the deadline came first.

    Mosquitto handles a client's packets in order, and for a SUBSCRIBE it queues the filters' retained
    messages, sends the SUBACK and then writes them (v2.0.11 fcf14eaf src/handle_subscribe.c:195-201
    retain__queue, :228 send__suback, :235-239 db__message_write_inflight_out_latest), all onto one FIFO
    of outgoing packets (lib/packet_mosq.c packet__queue). So the SUBACK of a SUBSCRIBE sent after the
    link's own comes after their retained messages. Twice: handle_subscribe writes them only while the
    socket is not busy (:235 `current_out_packet == NULL`), otherwise they wait for the next PUBACK
    (src/database.c:337-382 db__message_delete_outgoing); paho has sent a PUBACK for every message it
    read before the first marker's SUBACK, so they are written before the second marker is handled.
    The marker's filter is the rollout's, which the operator may read; its messages reach no handler.
    """
    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    return link.wait_connected(left()) and all(link.subscribe_acked(topics.rollout(), left()) for _ in range(2))
