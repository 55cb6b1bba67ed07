"""The Mosquitto settings that keep everyone where they belong, rendered for a broker and its files.
The ACLs themselves are committed in deploy/mosquitto/ and used verbatim by docker-compose, k3s and
the tests; this module only fills in paths, ports and the device id.

- The device's broker: no anonymous clients; a user per service and per camera (password file), the
  ACL in deploy/mosquitto/edge.acl.
- The fleet's broker: TLS only, a client certificate from the fleet's CA required, its common name
  taken as the user name, the ACL in deploy/mosquitto/cloud.acl (each device confined to its own
  topics).
- The bridge from a device's broker to the fleet's: TLS with the device's certificate, a persistent
  session (cleansession false) so nothing queued is lost across a cut link, the fleet topics only.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
EDGE_ACL, CLOUD_ACL = DEPLOY / "edge.acl", DEPLOY / "cloud.acl"
def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by mosquitto_passwd, as in production)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


def edge_listener(passwords: Path, acl: Path = EDGE_ACL) -> str:
    return f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"


def cloud_listener(certs: Path, server: str = "cloud-broker", acl: Path = CLOUD_ACL) -> str:
    return (
        "allow_anonymous false\n"
        f"cafile {certs / 'ca.crt'}\ncertfile {certs / f'{server}.crt'}\nkeyfile {certs / f'{server}.key'}\n"
        "require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n"
        f"acl_file {acl}\n"
    )


def bridge(device: str, host: str, port: int, certs: Path) -> str:
    """The device broker's bridge to the fleet's broker: its own topics out, the rollout and acks in."""
    own = f"edgefleet/{device}"
    return (
        f"\nconnection fleet-{device}\naddress {host}:{port}\n"
        f"bridge_cafile {certs / 'ca.crt'}\nbridge_certfile {certs / f'{device}.crt'}\nbridge_keyfile {certs / f'{device}.key'}\n"
        "bridge_tls_version tlsv1.2\nbridge_insecure false\n"
        # MQTT v5 end to end: content types and correlation data (a telemetry batch's id) must survive the hop.
        "bridge_protocol_version mqttv50\n"
        f"remote_clientid bridge-{device}\ncleansession false\nrestart_timeout 1 10\n"
        f"topic {own}/telemetry out 1\ntopic {own}/telemetry/ack in 1\ntopic {own}/sync/state out 1\n"
        f"topic {own}/status/+ out 1\ntopic edgefleet/_fleet/rollout in 1\n"
    )
