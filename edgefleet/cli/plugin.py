"""`edgefleet plugin publish|list`: WebAssembly plugins in the S3 registry (docs/plugins.md). Their
rollouts are `edgefleet rollout ... --plugin NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import ConfigFile, load_settings, reported
from shared.config import DEFAULT_KEY_DIR, StoreSettings, describe_keys
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.publish import PluginVersion

app = typer.Typer(no_args_is_help=True, help="Publish and list WebAssembly plugins (docs/plugins.md).")

Bucket = Annotated[str | None, typer.Option(help="The registry's bucket (default: EDGEFLEET_REGISTRY_BUCKET).")]


@app.command("publish", epilog=describe_keys(StoreSettings))
def plugin_publish(
    wasm: Annotated[Path, typer.Argument(help="The module (wasm32-wasi reactor), e.g. var/plugin-builds/<name>.wasm.")],
    spec: Annotated[Path, typer.Option(
        help="Its plugin.json: name, description, limits, grants, config (nothing else).")],
    version: Annotated[int | None, typer.Option(
        min=1, max=10**9, help="Version number (default: one past every version of the plugin in the registry).",
    )] = None,
    key: Annotated[Path, typer.Option(help="The operator's Ed25519 private key.")] = DEFAULT_KEY_DIR / "operator.key",
    bucket: Bucket = None,
    config: ConfigFile = None,
) -> None:
    """Check a plugin as a device will (valid module, the ABI's exports, ABI version), sign its manifest
    and upload it to the S3 registry as a new version; prints the version. Keys:"""
    from edgefleet.publish import publish_plugin
    from shared import s3

    settings = load_settings(StoreSettings, config, registry_bucket=bucket)
    # PluginRefused and PublishRefused are EdgefleetErrors; ValueError: a bad key file; OSError: none.
    with reported("plugin publish: refused", EdgefleetError, ValueError, OSError):
        done = publish_plugin(s3.client(settings), settings.registry_bucket, wasm, spec, key, version)
    typer.echo(f"published the plugin {done.name} v{done.version} (sha256 {done.sha256[:16]}…, signed by key "
               f"{done.key_id}) at s3://{settings.registry_bucket}/{done.prefix}", err=True)
    typer.echo(done.version)


@app.command("list", epilog=describe_keys(StoreSettings))
def plugin_list(
    name: Annotated[str | None, typer.Argument(help="One plugin (default: every plugin).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    bucket: Bucket = None,
    config: ConfigFile = None,
) -> None:
    """Every complete (signed) version: SHA-256, size, ABI and the key that signed it. Keys:"""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    from edgefleet.publish import list_plugins
    from shared import s3

    settings = load_settings(StoreSettings, config, registry_bucket=bucket)
    with reported("plugin list", ValueError, ClientError, BotoCoreError):  # ValueError: a bad name
        listed = list_plugins(s3.client(settings), settings.registry_bucket, name)
    if json_out:
        for entry in listed:
            typer.echo(json.dumps(entry.as_json()))
        return
    from rich.console import Console

    console = Console()
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(plugin_table(listed))


def plugin_table(listed: list[PluginVersion]) -> Table:
    """One row per plugin version: name, version, SHA-256, size, ABI, signing key, when it was published."""
    import datetime

    from rich.table import Table

    table = Table(title="edgefleet plugins")
    for column in ("plugin", "version", "sha256", "bytes", "abi", "signed by", "published (UTC)"):
        table.add_column(column, no_wrap=column in ("plugin", "sha256"))
    for v in listed:
        published = (datetime.datetime.fromtimestamp(v.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
                     if v.created_at is not None else "")
        table.add_row(v.name, str(v.version), v.sha256 or (v.problem or ""),
                      f"{v.size_bytes:,}" if v.size_bytes is not None else "", str(v.abi or ""), v.key_id or "",
                      published)
    return table
