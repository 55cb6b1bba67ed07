"""`edgefleet certs`: a development certificate authority, the cloud broker's server certificate and
one client certificate per device (its common name is the device id, which the cloud broker takes as
the user name its ACL confines and as the client id), the fleet's own identities (operator, one per
cloud_ingest replica), and the CA's revocation list (ca.crl, read by the fleet broker's `crlfile`).
Production fleets bring their own PKI; the files are the same shape."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.topics import (
    BROKER_ID,
    CONSOLE_ID,
    FLEET_ID,
    INGEST_ID,
    OPERATOR_ID,
    RESERVED_IDS,
    check_id,
    reserved_id,
)

VALID_DAYS = 825
CRL = "ca.crl"
# The fleet's own identities on its broker (deploy/mosquitto/cloud.acl grants them what no device
# may have), defined in shared/topics.py: cloud_ingest and the console refuse them as devices too. A
# device certificate with one of these common names would be an operator, an ingest replica or the
# console (which reads the whole fleet), so `issue_device` refuses them.
OPERATOR, INGEST, BROKER, FLEET, CONSOLE = OPERATOR_ID, INGEST_ID, BROKER_ID, FLEET_ID, CONSOLE_ID
RESERVED = RESERVED_IDS
reserved = reserved_id


def service_name(name: str) -> bool:
    """A client identity the fleet's services use: operator, console or cloud-ingest-<n> (one per replica)."""
    return name in (OPERATOR, CONSOLE) or (name.startswith(f"{INGEST}-") and name[len(INGEST) + 1:].isdigit())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key, cert: x509.Certificate) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / f"{stem}.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def new_ca(folder: Path, name: str = "edgefleet dev CA") -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(folder, "ca", key, cert)
    write_crl(folder, {})


def _ca(folder: Path):
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())


def revoked(folder: Path) -> dict[int, datetime.datetime]:
    """The serial numbers in folder/ca.crl and when each was revoked (none if there is no CRL yet)."""
    path = folder / CRL
    if not path.exists():
        return {}
    return {e.serial_number: e.revocation_date_utc for e in x509.load_pem_x509_crl(path.read_bytes())}


def write_crl(folder: Path, entries: dict[int, datetime.datetime]) -> Path:
    """folder/ca.crl, signed by the CA, listing `entries` (serial -> revocation time), rewritten whole.
    Its next update is as far off as a certificate's expiry: OpenSSL refuses every client once it passes.
    """
    ca_key, ca_cert = _ca(folder)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=VALID_DAYS)))
    for serial, when in entries.items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    path = folder / CRL
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def revoke(folder: Path, common_name: str) -> int:
    """Adds folder/<common_name>.crt's serial to folder/ca.crl (earlier entries kept); returns the serial.

    The fleet broker reads the CRL when it starts and on SIGHUP: reload or restart it to refuse the certificate.

    Raises:
        FileNotFoundError: no such certificate in folder.
    """
    cert = x509.load_pem_x509_certificate((folder / f"{common_name}.crt").read_bytes())
    entries = revoked(folder)
    entries.setdefault(cert.serial_number, datetime.datetime.now(datetime.UTC))
    write_crl(folder, entries)
    return cert.serial_number


def issue(folder: Path, common_name: str, server: bool = False,
          hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    """A certificate for `common_name` signed by the CA in folder: <common_name>.crt and .key."""
    ca_key, ca_cert = _ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h)
                 for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _write(folder, common_name, key, builder.sign(ca_key, hashes.SHA256()))
    return folder / f"{common_name}.crt"


def issue_device(folder: Path, device: str) -> Path:
    """A device's client certificate: its common name is the device id.

    Raises:
        ValueError: not a valid device id, or a name reserved for the fleet's services.
    """
    if reserved(device):
        raise ValueError(f"{device!r} is reserved for the fleet's own services ({', '.join(RESERVED)}, "
                         f"{INGEST}-<n>) and cannot be a device; issue it with --service")
    return issue(folder, check_id("device", device))


def issue_service(folder: Path, name: str) -> Path:
    """A fleet service's client certificate: `operator`, or `cloud-ingest-<n>` for replica n.

    Raises:
        ValueError: any other name.
    """
    if not service_name(name):
        raise ValueError(f"{name!r} is not a fleet service identity: {OPERATOR} or {INGEST}-<n> (one per replica)")
    return issue(folder, name)
