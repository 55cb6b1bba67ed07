"""`edgefleet certs|keys|broker ...`: the fleet's trust material. A development CA, its certificates
and revocation list; the operators' Ed25519 signing keys; the device broker's users and its bridge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cli.common import comma_list, fail, reported
from shared.config import DEFAULT_KEY_DIR

keys_app = typer.Typer(no_args_is_help=True, help="Operator signing keys.")
broker_app = typer.Typer(no_args_is_help=True,
                         help="Files for the Mosquitto brokers: passwords, the bridge to the fleet.")
certs_app = typer.Typer(no_args_is_help=True,
                        help="A development CA and certificates for the fleet broker and its bridges.")

CertDir = Annotated[Path, typer.Option("--out", help="The folder of ca.crt/ca.key and the certificates.")]
SERVICE_USERS = ("inference", "sync", "telemetry", "console")


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(
        help="Folder for <name>.key (private, mode 600) and <name>.pub.")] = DEFAULT_KEY_DIR,
    name: Annotated[str, typer.Option(help="File name stem.")] = "operator",
) -> None:
    """Make an Ed25519 signing key; devices trust its .pub half (EDGEFLEET_TRUSTED_KEYS_DIR)."""
    from shared.registry import new_key_pair

    with reported("keys new", FileExistsError):
        pair = new_key_pair(out, name)
    typer.echo(f"key {pair.key_id}: private {pair.private}, public {pair.public}", err=True)


@broker_app.command("passwords")
def broker_passwords(
    out: Annotated[Path, typer.Option(
        help="The Mosquitto password file; <user>.password files go beside it.")] = Path("var/broker/passwords"),
    cameras: Annotated[str, typer.Option(help="Camera ids, comma-separated: each gets its own user.")] = "cam-1",
) -> None:
    """A user and a random password per service and per camera, hashed by mosquitto_passwd
    (deploy/mosquitto/edge.acl names them)."""
    import secrets

    from edgefleet.brokerconf import password_file

    users = {u: secrets.token_urlsafe(18) for u in (*SERVICE_USERS, *comma_list(cameras))}
    out.parent.mkdir(parents=True, exist_ok=True)
    password_file(out, users)
    for user, password in users.items():
        (out.parent / f"{user}.password").touch(mode=0o600)
        (out.parent / f"{user}.password").write_text(password)
    typer.echo(f"{len(users)} users in {out}; their passwords in {out.parent}/<user>.password", err=True)


@broker_app.command("bridge")
def broker_bridge(
    device: Annotated[str, typer.Argument(help="The device id (its certificate's common name).")],
    host: Annotated[str, typer.Option(help="The fleet broker's host.")] = "cloud-broker",
    port: Annotated[int, typer.Option(help="The fleet broker's TLS port.")] = 8883,
    certs: Annotated[Path, typer.Option(
        help="Where the broker finds ca.crt, <device>.crt and <device>.key.")] = Path("/mosquitto/certs"),
    out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """The device broker's bridge to the fleet broker: TLS with the device's certificate, a persistent session."""
    from edgefleet.brokerconf import bridge

    text = bridge(device, host, port, certs)
    if out is None:
        typer.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


@certs_app.command("ca")
def certs_ca(out: CertDir = Path("var/certs")) -> None:
    """A new certificate authority for development fleets (ca.crt, ca.key, and its empty revocation list
    ca.crl, which the fleet broker requires). On an existing CA without ca.crl, writes only that."""
    from edgefleet.certs import CRL, new_ca, write_crl

    if (out / "ca.key").exists():
        if not (out / CRL).exists():  # a CA made before the fleet broker checked revocations (crlfile)
            typer.echo(f"revocation list written to {write_crl(out, {})}", err=True)
            return
        raise fail("certs ca", f"{out / 'ca.key'} exists; a CA is never overwritten")
    new_ca(out)
    typer.echo(f"CA written to {out}", err=True)


@certs_app.command("issue")
def certs_issue(
    names: Annotated[list[str], typer.Argument(
        help="Common names: device ids; with --service operator, console or cloud-ingest-<n>; "
        "with --server the broker's name.")],
    server: Annotated[bool, typer.Option(
        help="A server certificate (the cloud broker's) instead of a client one.")] = False,
    service: Annotated[bool, typer.Option(
        help="A fleet service's client certificate: operator, or cloud-ingest-<n> per replica.")] = False,
    hosts: Annotated[str, typer.Option(
        help="With --server: host names and addresses, comma-separated.")] = "localhost,127.0.0.1",
    out: CertDir = Path("var/certs"),
) -> None:
    """Certificates signed by the CA: a device's common name is its id, which the cloud broker's ACL confines.
    The fleet's own names (operator, cloud-ingest*, cloud-broker, _fleet) are never issued to a device."""
    from edgefleet.certs import issue, issue_device, issue_service

    for name in names:
        # ValueError: a reserved or malformed name; FileNotFoundError: no CA in --out.
        with reported("certs issue", ValueError, FileNotFoundError):
            if server:
                path = issue(out, name, True, tuple(comma_list(hosts)))
            else:
                path = (issue_service if service else issue_device)(out, name)
        typer.echo(f"issued {path}", err=True)


@certs_app.command("revoke")
def certs_revoke(
    names: Annotated[list[str], typer.Argument(
        help="Common names whose certificate (<name>.crt in --out) is revoked.")],
    out: CertDir = Path("var/certs"),
) -> None:
    """Adds the certificates to the CA's revocation list (ca.crl beside ca.crt). The fleet broker reads it
    at start and on SIGHUP: reload or restart it to refuse them."""
    from edgefleet.certs import revoke

    for name in names:
        with reported("certs revoke", FileNotFoundError):
            serial = revoke(out, name)
        typer.echo(f"revoked {name} (serial {serial:x}) in {out / 'ca.crl'}; "
                   "reload (SIGHUP) or restart the fleet broker to apply", err=True)
