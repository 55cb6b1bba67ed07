"""`edgefleet telemetry [audit]`: the telemetry service (the group with no sub-command), and the audit
of what reached S3 against what each device sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import ConfigFile, load_settings
from shared.config import IngestSettings, TelemetrySettings, describe_keys

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.audit import DeviceAudit

app = typer.Typer(help="The telemetry service (with no sub-command), and the completeness audit.",
                  invoke_without_command=True, epilog=describe_keys(TelemetrySettings))

AUDIT_COLUMNS = ("device", "epochs", "received", "highest seq", "declared lost", "missing (unexplained)", "duplicates")


@app.callback()
def telemetry(ctx: typer.Context, config: ConfigFile = None) -> None:
    """Run the telemetry service: drift alerts, resources, hard examples, store-and-forward to the cloud."""
    if ctx.invoked_subcommand is not None:
        return
    from services.telemetry.service import main

    raise typer.Exit(main(load_settings(TelemetrySettings, config)))


@app.command("audit")
def telemetry_audit(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per device instead of a table.")] = False,
    config: ConfigFile = None,
) -> None:
    """Per device: records in S3, the highest sequence number, what the device declared lost, what is missing."""
    import json
    from dataclasses import asdict

    from rich.console import Console

    from edgefleet.audit import audit
    from shared import s3

    settings = load_settings(IngestSettings, config)
    report = audit(s3.client(settings), settings.telemetry_bucket)
    if json_out:
        for device in sorted(report):
            typer.echo(json.dumps({**asdict(report[device]), "missing_count": report[device].missing_count}))
        return
    Console().print(audit_table(report, settings.telemetry_bucket))


def audit_table(report: dict[str, DeviceAudit], bucket: str) -> Table:
    """One row per device: epochs, records received, what was declared lost and what is missing."""
    from rich.table import Table

    table = Table(title=f"edgefleet telemetry audit · s3://{bucket}")
    for column in AUDIT_COLUMNS:
        table.add_column(column)
    for device, r in sorted(report.items()):
        lost = ", ".join(f"{reason} {n}" for reason, n in r.declared_lost.items()) or "none"
        missing = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in r.missing[:5]) or "none"
        epochs = ", ".join(f"{e.epoch} ({e.received})" for e in r.epochs.values())
        table.add_row(device, epochs, str(r.received), str(r.highest_seq), lost, missing, str(r.duplicates))
    return table
