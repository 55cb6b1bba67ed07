"""`edgefleet rollout start|promote|abort|status`: the operators' rollouts on the fleet broker."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import ConfigFile, comma_list, load_settings, reported
from shared.config import CommonSettings
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.fleet_rollout import DeviceRow

app = typer.Typer(no_args_is_help=True, help="Roll models out to the fleet: canary, promote, abort, status.")

FleetUrl = Annotated[str | None, typer.Option(help="The fleet broker (default: EDGEFLEET_MQTT_URL).")]
STATUS_COLUMNS = ("rollout", "state", "serving", "target", "reason", "age", "health")


@app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="The registry's model name.")],
    version: Annotated[int, typer.Argument(min=1, help="The published version.")],
    devices: Annotated[str | None, typer.Option(help="Only these devices, comma-separated.")] = None,
    group: Annotated[str | None, typer.Option(help="Only devices in these groups, comma-separated.")] = None,
    canary: Annotated[float, typer.Option(
        min=0.0001, max=100, help="Percent of the target that goes first (100: all).")] = 100.0,
    allow_downgrade: Annotated[bool, typer.Option(help="An explicit rollback to an older version.")] = False,
    rollout_id: Annotated[str | None, typer.Option(
        help="Name the rollout (default: model, version and a random suffix).")] = None,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Start a rollout: all devices, a group, listed devices, or a canary share of them."""
    from edgefleet import fleet_rollout as rollout
    from shared.schemas import RolloutTarget

    target = RolloutTarget(devices=comma_list(devices), groups=comma_list(group), share=canary / 100)
    with reported("rollout start", EdgefleetError, ValueError):  # ValueError: a bad model name or version
        started = rollout.start(_fleet(config, mqtt_url), model, version, target, allow_downgrade, rollout_id)
    typer.echo(f"rollout {started.rollout_id}: {model} v{version}, {started.phase.value}, "
               f"{canary:g} % of {', '.join(target.devices or target.groups) or 'all devices'}", err=True)
    typer.echo(started.rollout_id)


@app.command("promote")
def rollout_promote(mqtt_url: FleetUrl = None, config: ConfigFile = None) -> None:
    """Every device of the rollout's target installs it (after a canary)."""
    _change("promoted", config, mqtt_url)


@app.command("abort")
def rollout_abort(mqtt_url: FleetUrl = None, config: ConfigFile = None) -> None:
    """Every device that installed the rollout's model goes back to the one it had."""
    _change("aborted", config, mqtt_url)


@app.command("status")
def rollout_status(
    wait: Annotated[float, typer.Option(min=0.1, help="Seconds to collect the devices' retained states.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Per device (named by its topic): state, model served, the rollout's model, the last reason, the
    report's age, and whether the device is stale (nothing heard for 3 status intervals)."""
    import json

    from rich.console import Console

    from edgefleet import fleet_rollout as rollout

    rows = rollout.rows(_fleet(config, mqtt_url), wait)
    if json_out:
        for row in rows:
            typer.echo(json.dumps(row.as_json()))
        return
    console = Console()
    # Piped into grep or a file there is no terminal width to respect: one row per line.
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(status_table(rows))


def _fleet(config: Path | None, mqtt_url: str | None) -> CommonSettings:
    return load_settings(CommonSettings, config, mqtt_url=mqtt_url)


def _change(phase_name: str, config: Path | None, mqtt_url: str | None) -> None:
    from edgefleet import fleet_rollout as rollout
    from shared.schemas import RolloutPhase

    with reported("rollout", EdgefleetError):  # the broker unreachable, no rollout to change
        changed = rollout.change_phase(_fleet(config, mqtt_url), RolloutPhase(phase_name))
    typer.echo(f"rollout {changed.rollout_id}: {phase_name}", err=True)


def status_table(rows: list[DeviceRow]) -> Table:
    """One row per device: its rollout, state, the model served and the target, the last reason, age, health."""
    from rich.table import Table

    table = Table(title="edgefleet rollout status")
    # A device id is never cut or wrapped (operators grep for it); other cells wrap rather than elide.
    table.add_column("device", no_wrap=True, min_width=max((len(row.device) for row in rows), default=6))
    for column in STATUS_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        r = row.report
        table.add_row(row.device, (r.rollout_id or "") if r else "", r.state.value if r else "(no report)",
                      f"{r.serving.name} v{r.serving.version}" if r and r.serving else "",
                      f"{r.target.name} v{r.target.version}" if r and r.target else "", (r.reason or "") if r else "",
                      f"{row.age_s:.0f} s" if row.age_s is not None else "", _health(row))
    return table


def _health(row: DeviceRow) -> str:
    notes = ["STALE" if row.stale else "ok"]
    if row.last_heard_s is not None and row.age_s is not None and abs(row.last_heard_s - max(row.age_s, 0)) > 1:
        notes.append(f"heard {row.last_heard_s:.0f} s ago")
    if row.clock_ahead:
        notes.append("clock ahead")
    if row.status is not None and row.status.state.value != "online":
        notes.append(f"sync {row.status.state.value}")
    if row.claimed_device:
        notes.append(f"payload claims {row.claimed_device}")
    return ", ".join(notes)
