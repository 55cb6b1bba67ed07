"""The Mosquitto settings that keep everyone where they belong, rendered for a broker and its files.
The configs and ACLs are committed in deploy/mosquitto/ and used verbatim by docker-compose, k3s and
the tests (a spawned broker takes every directive of edge.conf/cloud.conf but its listener ports,
persistence location and include_dir); this module only fills in paths, ports and the device id.

- The device's broker: no anonymous clients; a user per service and per camera (password file), the
  ACL in deploy/mosquitto/edge.acl, payload and packet size caps above a frame's; a second, TLS
  listener for cameras on the device's network, under the same users and ACL.
- The fleet's broker: TLS only, a client certificate from the fleet's CA required and checked against
  the CA's revocation list, its common name taken as the user name and as the client id, the ACL in
  deploy/mosquitto/cloud.acl (each device confined to its own topics), payload and packet size caps,
  a snapshot to disk every second.
- The bridge from a device's broker to the fleet's: TLS with the device's certificate, a persistent
  session (cleansession false) so nothing queued is lost across a cut link, the fleet topics only.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
EDGE_ACL, CLOUD_ACL = DEPLOY / "edge.acl", DEPLOY / "cloud.acl"
EDGE_CONF, CLOUD_CONF = DEPLOY / "edge.conf", DEPLOY / "cloud.conf"
# What the deployment decides and a spawned Broker (edgefleet/broker.py) decides for itself: where it
# listens, whether and where it persists, where bridge files live.
_LOCAL = ("persistence_location", "include_dir")
# Mosquitto's per-listener directives (mosquitto.conf(5), "Listeners" and "Certificate based SSL/TLS
# support"): they belong to the `listener` line above them, and leave with it when a spawned broker
# does not open that listener.
_LISTENER_SCOPED = frozenset({
    "bind_interface", "http_dir", "max_connections", "max_qos", "max_topic_alias", "mount_point", "protocol",
    "socket_domain", "use_username_as_clientid", "websockets_headers_size", "cafile", "capath", "certfile",
    "keyfile", "ciphers", "ciphers_tls1.3", "crlfile", "dhparamfile", "require_certificate", "tls_engine",
    "tls_engine_kpass_sha1", "tls_keyform", "tls_version", "use_identity_as_username", "use_subject_as_username",
    "psk_hint",
})


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by mosquitto_passwd, as in production)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


def directives(conf: Path, paths: dict[str, Path | str], listeners: dict[int, int] | None = None) -> str:
    """The settings of a committed broker config, for a broker spawned here: the same directives,
    production paths (longest first) replaced by local ones, minus what the spawner decides.

    The config's first listener is the spawner's own (edgefleet/broker.py writes its `listener` line
    first, so that listener's directives attach to it). Each later listener opens on 127.0.0.1 at the
    port `listeners` maps its production port to, or is left out with its own directives.

    Params:
        conf: a file of deploy/mosquitto/.
        paths: production path -> local path.
        listeners: production port of a later listener -> loopback port to open it on.
    Returns:
        The directives, one a line.
    Raises:
        ValueError: a directive still names a production path (/mosquitto/...) no entry replaces.
    """
    listeners = listeners or {}
    lines, seen_listener, dropping = [], False, False
    for raw in conf.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.split()[0] in _LOCAL:
            continue
        keyword = line.split()[0]
        if keyword == "listener":
            port = int(line.split()[1])
            first, seen_listener = not seen_listener, True
            dropping = not first and port not in listeners
            if first or dropping:
                continue
            line = f"listener {listeners[port]} 127.0.0.1"
        elif dropping and keyword in _LISTENER_SCOPED:
            continue
        for production in sorted(paths, key=len, reverse=True):
            line = line.replace(production, str(paths[production]))
        if " /mosquitto/" in line:
            raise ValueError(f"{conf.name}: no local path for {line!r}")
        lines.append(line)
    return "\n".join(lines) + "\n"


LAN_PORT, LAN_SERVER = 8884, "edge-server"


def edge_listener(passwords: Path, acl: Path = EDGE_ACL, lan_port: int | None = None, lan_certs: Path | None = None,
                  lan_server: str = LAN_SERVER) -> str:
    """deploy/mosquitto/edge.conf's settings with this password file and ACL.

    Params:
        lan_port: also open edge.conf's listener for cameras on the LAN (TLS, port 8884 in
            production) on this loopback port; None leaves it out.
        lan_certs: with lan_port, the folder of its server certificate and key.
        lan_server: their stem there (<lan_server>.crt and .key), as `edgefleet certs issue` names them.
    Returns:
        The directives, for Broker(security=...).
    """
    paths: dict[str, Path | str] = {"/mosquitto/config/passwords": passwords, "/mosquitto/config/edge.acl": acl}
    if lan_port is not None:
        if lan_certs is None:
            raise ValueError("the LAN listener needs lan_certs, the folder of its server certificate")
        paths |= {f"/mosquitto/certs/{LAN_SERVER}.crt": lan_certs / f"{lan_server}.crt",
                  f"/mosquitto/certs/{LAN_SERVER}.key": lan_certs / f"{lan_server}.key"}
    return directives(EDGE_CONF, paths, {LAN_PORT: lan_port} if lan_port is not None else None)


def cloud_listener(certs: Path, server: str = "cloud-broker", acl: Path = CLOUD_ACL) -> str:
    """deploy/mosquitto/cloud.conf's settings with the CA, CRL and server certificate in `certs`."""
    return directives(CLOUD_CONF, {
        "/mosquitto/certs/cloud-broker.crt": certs / f"{server}.crt",
        "/mosquitto/certs/cloud-broker.key": certs / f"{server}.key",
        "/mosquitto/certs/": f"{certs}/",
        "/mosquitto/config/cloud.acl": acl,
    })


# The bridge's settings, defined once: `bridge` renders them and the simulator's links
# (edgefleet/simulate/link.py) hold a simulated device's session the same way.
BRIDGE_RESTART_S = (1.0, 10.0)  # `restart_timeout 1 10`: first retry after about a second, backing off to ten
BRIDGE_KEEPALIVE_S = 60  # mosquitto's bridge default keepalive_interval (not rendered: the default)
# `cleansession false` over MQTT v5: the fleet broker keeps the session (and queued QoS 1 messages) across a cut.
BRIDGE_SESSION_EXPIRY_S = 24 * 3600
BRIDGE_MAX_INFLIGHT = 20  # mosquitto's max_inflight_messages default, which a bridge's client also gets


def bridge_topics(device: str) -> list[tuple[str, str, int]]:
    """The topics a device's bridge carries: (topic, direction "out" or "in", QoS), in the rendered order."""
    own = f"edgefleet/{device}"
    return [(f"{own}/telemetry", "out", 1), (f"{own}/telemetry/ack", "in", 1), (f"{own}/sync/state", "out", 1),
            (f"{own}/status/+", "out", 1), ("edgefleet/_fleet/rollout", "in", 1), (f"{own}/sync/plugins/+", "out", 1),
            ("edgefleet/_fleet/plugin-rollouts/+", "in", 1)]


def bridge_queue_limit() -> int:
    """edge.conf's max_queued_messages: what the device broker holds for its bridge while the link is down
    (past it, new QoS 1 messages are dropped).

    Raises:
        ValueError: edge.conf sets none.
    """
    for raw in EDGE_CONF.read_text().splitlines():
        words = raw.split()
        if len(words) == 2 and words[0] == "max_queued_messages":
            return int(words[1])
    raise ValueError(f"{EDGE_CONF}: no max_queued_messages")


def bridge(device: str, host: str, port: int, certs: Path) -> str:
    """The device broker's bridge to the fleet's broker: its own topics out, the rollout and acks in."""
    low, high = (f"{s:g}" for s in BRIDGE_RESTART_S)
    topic_lines = "".join(f"topic {topic} {direction} {qos}\n" for topic, direction, qos in bridge_topics(device))
    return (
        f"\nconnection fleet-{device}\naddress {host}:{port}\n"
        f"bridge_cafile {certs / 'ca.crt'}\nbridge_certfile {certs / f'{device}.crt'}\n"
        f"bridge_keyfile {certs / f'{device}.key'}\n"
        "bridge_tls_version tlsv1.2\nbridge_insecure false\n"
        # MQTT v5 end to end: content types and correlation data (a telemetry batch's id) must survive the hop.
        "bridge_protocol_version mqttv50\n"
        # The fleet broker takes the certificate's common name as the client id (cloud.conf), whatever is asked.
        f"remote_clientid {device}\ncleansession false\nrestart_timeout {low} {high}\n"
        f"{topic_lines}"
    )
