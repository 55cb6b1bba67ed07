"""`edgefleet telemetry [audit]`: the telemetry service (the group with no sub-command), and the audit
of what reached S3 against what each device sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import ConfigFile, fail, load_settings, reported
from shared.config import IngestSettings, TelemetrySettings, describe_keys

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.audit import DeviceAudit

app = typer.Typer(help="The telemetry service (with no sub-command), and the completeness audit.",
                  invoke_without_command=True, epilog=describe_keys(TelemetrySettings))

AUDIT_COLUMNS = ("device", "epochs", "received", "highest seq", "declared lost", "sent before this store existed",
                 "lost (acknowledged by this store)", "missing (unexplained)", "duplicates",
                 "copies (a batch stored again)")


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
    """Per device: records in S3, the highest sequence number, what the device declared lost, what an earlier
    store acknowledged (sent before this store existed), what this store lost, and what is missing unexplained."""
    import json
    from dataclasses import asdict

    from botocore.exceptions import BotoCoreError, ClientError
    from rich.console import Console

    from edgefleet.audit import audit
    from shared import lake, s3

    settings = load_settings(IngestSettings, config)
    client = s3.client(settings)
    bucket = settings.telemetry_bucket
    # A marker or an index that is not one names its key, and so does a store that does not answer: no traceback.
    with reported("telemetry audit", lake.StoreMarkerInvalid, lake.BatchIndexInvalid):
        try:
            store = lake.read_store_marker(client, bucket)
        except (ClientError, BotoCoreError) as exc:
            raise fail("telemetry audit", f"cannot read s3://{bucket}/{lake.STORE_MARKER}: {exc}") from None
        try:
            report = audit(client, bucket, store)
        except (ClientError, BotoCoreError) as exc:
            raise fail("telemetry audit", f"cannot read the batch indexes under s3://{bucket}/{lake.BATCHES}/ "
                                          f"and {lake.FLUSHES}/: {exc}") from None
    if json_out:
        for device in sorted(report):
            r = report[device]
            typer.echo(json.dumps({**asdict(r), "missing_count": r.missing_count, "lost_count": r.lost_count,
                                   "before_store_count": r.before_store_count,
                                   "store": store.store if store else None}))
        return
    Console().print(audit_table(report, bucket, store.store if store else None))


def _ranges(ranges: list[tuple[int, int]]) -> str:
    """The first few ranges, "1-80, 95"; "none" for none."""
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges[:5]) or "none"


def audit_table(report: dict[str, DeviceAudit], bucket: str, store: str | None = None) -> Table:
    """One row per device: epochs, records received, what was declared lost, what an earlier store
    acknowledged, what this store lost, and what is missing with no explanation."""
    from rich.table import Table

    # Without a store id no acknowledged range can be told to be another store's: the audit explains nothing by it.
    who = f"store {store}" if store else "no store id (store marker absent): earlier stores cannot be told apart"
    table = Table(title=f"edgefleet telemetry audit · s3://{bucket} · {who}")
    for column in AUDIT_COLUMNS:
        table.add_column(column)
    for device, r in sorted(report.items()):
        lost = ", ".join(f"{reason} {n}" for reason, n in r.declared_lost.items()) or "none"
        epochs = ", ".join(f"{e.epoch} ({e.received})" for e in r.epochs.values())
        table.add_row(device, epochs, str(r.received), str(r.highest_seq), lost, _ranges(r.before_store),
                      _ranges(r.lost), _ranges(r.missing), str(r.duplicates), str(r.copies))
    return table
