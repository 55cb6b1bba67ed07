"""The topic scheme. Every topic any part of edgefleet uses is built here and nowhere else.

    edgefleet/<device>/frames/<camera>        frames in (raw JPEG/PNG or a msgpack envelope)
    edgefleet/<device>/predictions/<camera>   one prediction per frame
    edgefleet/<device>/errors                 error reports (bad frames, provider fallback, ...)
    edgefleet/<device>/status/<service>       retained service status (online/offline, counters)
    edgefleet/<device>/inference/switch       sync -> inference: serve this model now
    edgefleet/<device>/inference/switched     inference -> sync: the outcome of a switch
    edgefleet/<device>/sync/state             retained: where this device is in the current rollout
    edgefleet/_fleet/rollout                  retained: the fleet's current rollout, from the operators
    edgefleet/<device>/alerts                 telemetry: drift and health alerts, raised and resolved
    edgefleet/<device>/telemetry              on the cloud broker: batches from the device's outbox
    edgefleet/<device>/telemetry/ack          on the cloud broker: cloud_ingest stored a batch
    edgefleet/<device>/plugins/<name>/...     a plugin's own messages (docs/plugins.md), nothing else's
    edgefleet/<device>/inference/plugin-switch    sync -> inference: run this set of plugins now
    edgefleet/<device>/inference/plugin-switched  inference -> sync: the outcome of a plugin switch
    edgefleet/<device>/sync/plugins/<name>    retained: where this device is in a plugin's rollout
    edgefleet/_fleet/plugin-rollouts/<name>   retained: a plugin's current rollout, from the operators

`_fleet` can never be a device id (ids start with a letter or digit). No `_fleet` topic may match a
per-device pattern: the brokers' ACLs grant devices' services `edgefleet/+/...` lines, and `+` matches
`_fleet` too: a plugin rollout kept under the `plugins` level there would be writable by the inference
user, whose ACL grants `edgefleet/+/plugins/#`.
"""

from __future__ import annotations

import re

ROOT = "edgefleet"

# MQTT forbids wildcards and separators inside a level; we also keep ids shell- and path-safe.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "1-64 characters of letters, digits, '_', '.', '-' starting with a letter or digit"


def is_id(value: str) -> bool:
    """Whether `value` is a device or camera id (check_id's rule), without raising: for ids read off a
    topic, where anything up to MQTT's 65535 bytes may arrive."""
    return _ID.fullmatch(value) is not None


def check_id(kind: str, value: str) -> str:
    """A device or camera id safe to be one topic level (and a file name).

    :param str kind: what the id names ("device", "camera"), for the error's text.
    :param str value: the id.
    :returns: the id unchanged.
    :raises ValueError: unless it is 1-64 letters, digits, '_', '.', '-' starting with a letter or digit.
    """
    if not is_id(value):
        raise ValueError(f"{kind} id {value!r} must be {ID_RULE}")
    return value


def frames(device: str, camera: str) -> str:
    return f"{ROOT}/{device}/frames/{camera}"


def all_frames(device: str) -> str:
    return f"{ROOT}/{device}/frames/+"


def predictions(device: str, camera: str) -> str:
    return f"{ROOT}/{device}/predictions/{camera}"


def all_predictions(device: str) -> str:
    return f"{ROOT}/{device}/predictions/+"


def errors(device: str) -> str:
    return f"{ROOT}/{device}/errors"


def status(device: str, service: str) -> str:
    return f"{ROOT}/{device}/status/{service}"


def all_status(device: str) -> str:
    return f"{ROOT}/{device}/status/+"


# The sync service's name in its status topic; the operators' rollout status reads it for liveness.
SYNC_SERVICE = "sync"
INGEST_SERVICE = "cloud_ingest"  # a replica's status: edgefleet/<replica>/status/cloud_ingest
INFERENCE_SERVICE = "inference"
TELEMETRY_SERVICE = "telemetry"
# The device services whose statuses cross to the fleet broker (deploy/mosquitto/cloud.acl lets a device
# write exactly these status topics); a status under any other name is not a device's.
DEVICE_SERVICES = (INFERENCE_SERVICE, SYNC_SERVICE, TELEMETRY_SERVICE)

# The fleet's own identities on its broker: certificate common names that are never a device
# (edgefleet/certs.py refuses to issue them to one; cloud_ingest stores no batch and the console shows no
# state under them). `_fleet` is the rollouts' topic level.
OPERATOR_ID, INGEST_ID, BROKER_ID = "operator", "cloud-ingest", "cloud-broker"
FLEET_ID, CONSOLE_ID = "_fleet", "console"
RESERVED_IDS = (OPERATOR_ID, INGEST_ID, BROKER_ID, FLEET_ID, CONSOLE_ID)


def reserved_id(name: str) -> bool:
    """Whether `name` is kept for the fleet's services, so never a device.

    :param str name: a certificate common name or a topic's device level.
    :returns: True for operator, console, cloud-broker, _fleet, cloud-ingest and cloud-ingest-<anything>.
    """
    return name in RESERVED_IDS or name.startswith(f"{INGEST_ID}-")


def every_device_status(service: str) -> str:
    """One service's retained status on every device (the operators' view of the fleet)."""
    return f"{ROOT}/+/status/{service}"


def model_switch(device: str) -> str:
    return f"{ROOT}/{device}/inference/switch"


def model_switched(device: str) -> str:
    return f"{ROOT}/{device}/inference/switched"


def sync_state(device: str) -> str:
    return f"{ROOT}/{device}/sync/state"


def all_sync_states() -> str:
    return f"{ROOT}/+/sync/state"


def rollout() -> str:
    return f"{ROOT}/_fleet/rollout"


def alerts(device: str) -> str:
    return f"{ROOT}/{device}/alerts"


def telemetry(device: str) -> str:
    return f"{ROOT}/{device}/telemetry"


def telemetry_ack(device: str) -> str:
    return f"{ROOT}/{device}/telemetry/ack"


def all_telemetry(share_group: str | None = None) -> str:
    """Every device's batches; with a share group, split among the group's subscribers (MQTT v5)."""
    topic = f"{ROOT}/+/telemetry"
    return f"$share/{share_group}/{topic}" if share_group else topic


def all_telemetry_acks() -> str:
    return f"{ROOT}/+/telemetry/ack"


# -- plugins (docs/plugins.md) ---------------------------------------------------------------------------


def plugin_messages(device: str, plugin: str) -> str:
    """The root of one plugin's own messages; the host publishes a plugin's message at root/<suffix>."""
    return f"{ROOT}/{device}/plugins/{plugin}"


def plugin_message(device: str, plugin: str, suffix: str) -> str:
    """One message's topic; `suffix` must have passed shared.plugin.check_emit_suffix."""
    return f"{plugin_messages(device, plugin)}/{suffix}"


def all_plugin_messages(device: str) -> str:
    return f"{ROOT}/{device}/plugins/+/#"


def plugin_switch(device: str) -> str:
    return f"{ROOT}/{device}/inference/plugin-switch"


def plugin_switched(device: str) -> str:
    return f"{ROOT}/{device}/inference/plugin-switched"


def plugin_sync_state(device: str, plugin: str) -> str:
    return f"{ROOT}/{device}/sync/plugins/{plugin}"


def all_plugin_sync_states(plugin: str = "+") -> str:
    """Every device's state in one plugin's rollout (or in every plugin's, by default)."""
    return f"{ROOT}/+/sync/plugins/{plugin}"


def plugin_rollout(plugin: str) -> str:
    # Not below a `plugins` level: the inference user's ACL grants `edgefleet/+/plugins/#`.
    return f"{ROOT}/_fleet/plugin-rollouts/{plugin}"


def all_plugin_rollouts() -> str:
    return f"{ROOT}/_fleet/plugin-rollouts/+"


def plugin_of(topic: str) -> str:
    """The <name> level (the last) of a plugin rollout or plugin sync-state topic."""
    return topic.rsplit("/", 1)[-1]


def device_of(topic: str) -> str:
    """The <device> level of any per-device topic."""
    return topic.split("/")[1]


def last_level(topic: str) -> str:
    """The camera of a frames/predictions topic, the service of a status topic."""
    return topic.rsplit("/", 1)[-1]
