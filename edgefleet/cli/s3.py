"""`edgefleet s3 device-key|policy`: least privilege in the S3 store, a read-only key per device
(models/* and plugins/*)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cli.common import ConfigFile, load_settings, reported
from shared.config import StoreSettings, describe_keys
from shared.errors import EdgefleetError

app = typer.Typer(no_args_is_help=True, help="Least privilege in the S3 store: a key per device that reads "
                   "models/* and plugins/* only.")


@app.command("device-key", epilog=describe_keys(StoreSettings))
def s3_device_key(
    device: Annotated[str, typer.Argument(help="The device id: its IAM user is edgefleet-device-<DEVICE>.")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for access-key and secret-key (default: var/s3/<DEVICE>).")] = None,
    config: ConfigFile = None,
) -> None:
    """With the store's admin keys (these EDGEFLEET_S3_* keys), through its IAM API (AWS, moto): a user and a key
    that can only read models/* and plugins/* of the registry. Keeps a key already in --out that still works; a new key
    replaces the user's others. MinIO has no IAM API: see README for its `mc admin` commands. Keys:"""
    from edgefleet.s3access import DEFAULT_KEYS_DIR, issue

    settings = load_settings(StoreSettings, config)
    with reported("s3 device-key", EdgefleetError):  # DeviceKeyError: no IAM API, admin keys refused, a bad id
        done = issue(settings, device, out or DEFAULT_KEYS_DIR / device)
    if not done.created:
        typer.echo(f"kept: the key {done.access_key_id} of {done.user} in {done.folder} still works", err=True)
        return
    revoked = f"; revoked its older keys {', '.join(done.revoked)}" if done.revoked else ""
    typer.echo(f"created key {done.access_key_id} for {done.user} (read models/* and plugins/* only) "
               f"in {done.folder}{revoked}",
               err=True)


@app.command("policy")
def s3_policy(
    bucket: Annotated[str | None, typer.Option(
        help="The registry bucket (default: EDGEFLEET_REGISTRY_BUCKET).")] = None,
    config: ConfigFile = None,
) -> None:
    """Print the device policy for a registry bucket (deploy/s3/device-policy.json is the default's), for
    `mc admin policy create`."""
    import json

    from edgefleet.s3access import device_policy

    typer.echo(json.dumps(device_policy(bucket or load_settings(StoreSettings, config).registry_bucket), indent=2))
