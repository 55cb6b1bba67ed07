"""`edgefleet rollout start|promote|abort|status`: the operators' rollouts on the fleet broker, of the
model or (--plugin) of a WebAssembly plugin."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import ConfigFile, comma_list, fail, load_settings, reported
from shared.config import DEFAULT_KEY_DIR, CommonSettings, StoreSettings
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.fleet_rollout import AnyRollout, DeviceRow, PacingPlan

app = typer.Typer(no_args_is_help=True,
                  help="Roll models (or, with --plugin, plugins) out to the fleet: canary, promote, abort, status.")

FleetUrl = Annotated[str | None, typer.Option(help="The fleet broker (default: EDGEFLEET_MQTT_URL).")]
PluginName = Annotated[str | None, typer.Option(
    "--plugin", help="This plugin's rollout instead of the model's.", metavar="NAME")]
STATUS_COLUMNS = ("rollout", "state", "serving", "target", "reason", "age", "health")
# The pacing's defaults: about this many downloads at once across the fleet, each device fetching at about
# this many bytes a second (so a 1 MiB model is about 1 s of a device's time: the 1 s floor).
MAX_CONCURRENT_DOWNLOADS = 50
DEVICE_DOWNLOAD_BYTES_S = 2_000_000
MaxConcurrent = Annotated[int, typer.Option(
    "--max-concurrent-downloads", min=0, help="Pace the rollout so that about this many devices download at "
    "once: each device waits its turn (a hash of its id), the turns spread over devices * download time / this. "
    "Only when more devices than this download and none of them (online) runs a release older than the pacing "
    "field; 0: no pacing, every device at once.")]
DeviceBytesS = Annotated[float, typer.Option(
    "--device-download-bytes-s", min=1, help="A device's download rate, bytes/s, that sizes the pacing (each "
    "device's download counts at least 1 s).")]


@app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="The registry's model name (with --plugin: plugin name).")],
    version: Annotated[int, typer.Argument(min=1, help="The published version.")],
    devices: Annotated[str | None, typer.Option(help="Only these devices, comma-separated.")] = None,
    group: Annotated[str | None, typer.Option(help="Only devices in these groups, comma-separated.")] = None,
    canary: Annotated[float | None, typer.Option(
        min=0.0001, max=100, help="Percent of the target that goes first, rounded up to whole devices (at least "
        "one) where the CLI can count them: the online devices on the fleet broker, or --devices; with --group "
        "each device decides by itself; with none seen online, refused (see --let-devices-draw). Default: 100, "
        "all at once.")] = None,
    canary_devices: Annotated[int | None, typer.Option(
        min=1, help="Exactly this many devices go first, chosen as a share would choose them (not with --group).",
    )] = None,
    let_devices_draw: Annotated[bool, typer.Option(
        help="With --canary and no device seen online on the fleet broker: publish the share anyway, each device "
        "drawing by itself (on a small fleet that may be none or all of them). Refused without it.")] = False,
    allow_downgrade: Annotated[bool, typer.Option(help="An explicit rollback to an older version.")] = False,
    rollout_id: Annotated[str | None, typer.Option(
        help="Name the rollout (default: model, version and a random suffix).")] = None,
    plugin: Annotated[bool, typer.Option(
        "--plugin", help="MODEL names a plugin: roll out that plugin's version beside the model.")] = False,
    max_concurrent_downloads: MaxConcurrent = MAX_CONCURRENT_DOWNLOADS,
    device_download_bytes_s: DeviceBytesS = DEVICE_DOWNLOAD_BYTES_S,
    trusted_keys: Annotated[Path, typer.Option(
        envvar="EDGEFLEET_TRUSTED_KEYS_DIR",
        help="The operators' public keys (*.pub) the version's signature must verify against, as on the devices.",
    )] = DEFAULT_KEY_DIR,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Start a rollout of a version the registry holds signed by a trusted key (EDGEFLEET_S3_* name the
    registry): all devices, a group, listed devices, or a canary of them. Prints the canary's devices
    before it starts, then the rollout's id."""
    from edgefleet import fleet_rollout as rollout
    from shared import registry
    from shared.schemas import RolloutTarget

    if canary is not None and canary_devices is not None:
        raise fail("rollout start", ValueError("--canary and --canary-devices: give one"), code=2)
    with reported("rollout start", ValueError):  # a name or version that could never be a registry key
        registry.check_name(model)
        registry.check_version(version)
    target = RolloutTarget(devices=comma_list(devices), groups=comma_list(group),
                           share=(100.0 if canary is None else canary) / 100)
    settings, size_bytes = _signed_settings(config, mqtt_url, model, version, trusted_keys, plugin)
    rollout_id = rollout_id or rollout.new_rollout_id(model, version)
    counted = (canary_devices is not None or target.share < 1) and not (target.devices or target.groups)
    paced = max_concurrent_downloads > 0  # the devices to pace are counted, and their releases read
    versions = rollout.online_versions(settings) if counted or paced else {}
    known = list(versions) if counted or not target.devices else []
    with reported("rollout start: refused", rollout.CanaryRefused, code=2):
        plan = rollout.plan_canary(rollout_id, target, known, canary_devices, let_devices_draw)
    starting = plan.target.canary_devices or target.devices or known  # for a drawn share: all, an upper bound
    pacing = rollout.plan_pacing(rollout.targeted_at_start(plan.target, known), size_bytes,
                                 max_concurrent_downloads, device_download_bytes_s,
                                 rollout.too_old_for_pacing(starting, versions))
    typer.echo(plan.line, err=True)  # the plan, before anything is published
    typer.echo(pacing.line, err=True)
    with reported("rollout start", EdgefleetError, ValueError):
        started = rollout.start(settings, model, version, plan.target, allow_downgrade, rollout_id, plugin=plugin,
                                pacing=pacing.pacing)
    typer.echo(f"rollout {started.rollout_id}: {'the plugin ' if plugin else ''}{model} v{version}, "
               f"{started.phase.value}", err=True)
    typer.echo(started.rollout_id)


@app.command("promote")
def rollout_promote(plugin: PluginName = None, max_concurrent_downloads: MaxConcurrent = MAX_CONCURRENT_DOWNLOADS,
                    device_download_bytes_s: DeviceBytesS = DEVICE_DOWNLOAD_BYTES_S, mqtt_url: FleetUrl = None,
                    config: ConfigFile = None) -> None:
    """Every device of the rollout's target installs it (after a canary), paced when more devices than
    --max-concurrent-downloads are to download (their count: the online devices not in the canary; the
    artifact's size: its manifest in the registry, EDGEFLEET_S3_*). Prints the pacing before it publishes."""
    from edgefleet import fleet_rollout as rollout
    from shared.schemas import RolloutPhase

    settings = load_settings(StoreSettings, config, mqtt_url=mqtt_url)
    # The broker unreachable, no rollout to promote; ValueError: a bad plugin name.
    with reported("rollout", EdgefleetError, ValueError):
        retained = rollout.current(settings, plugin=plugin)
    pacing = _promote_pacing(settings, retained, max_concurrent_downloads, device_download_bytes_s)
    typer.echo(pacing.line, err=True)  # before anything is published
    with reported("rollout", EdgefleetError, ValueError):
        changed = rollout.change_phase(settings, RolloutPhase.PROMOTED, plugin, retained, pacing.pacing)
    typer.echo(f"rollout {changed.rollout_id}: promoted", err=True)


def _promote_pacing(settings: StoreSettings, retained: AnyRollout, max_concurrent: int,
                    device_bytes_s: float) -> PacingPlan:
    """The promote's pacing: the devices not in the canary (listed, else those online) and, only when
    there are more of them than max_concurrent and none runs a release older than the pacing field
    (fleet_rollout.PACING_SINCE), the artifact's size from its manifest in the registry.

    Raises:
        typer.Exit: 1 when the pacing is needed and the registry cannot say the artifact's size.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from edgefleet import fleet_rollout as rollout
    from shared import s3

    if max_concurrent <= 0:
        return rollout.plan_pacing(0, 0, max_concurrent, device_bytes_s)
    versions = rollout.online_versions(settings)
    promoted = rollout.promoted_devices(retained, [] if retained.target.devices else list(versions))
    too_old = rollout.too_old_for_pacing(promoted, versions)
    size_bytes = 0
    if len(promoted) > max_concurrent and not too_old:
        with reported("rollout promote: cannot size the pacing (the registry: EDGEFLEET_S3_*; "
                      "--max-concurrent-downloads 0 promotes without pacing)", ValueError, ClientError, BotoCoreError):
            size_bytes = rollout.artifact_bytes(s3.client(settings), settings.registry_bucket, retained)
    return rollout.plan_pacing(len(promoted), size_bytes, max_concurrent, device_bytes_s, too_old)


@app.command("abort")
def rollout_abort(plugin: PluginName = None, mqtt_url: FleetUrl = None, config: ConfigFile = None) -> None:
    """Every device that installed the rollout's model (or plugin) goes back to the one it had; aborting a
    plugin's first version removes the plugin."""
    _change("aborted", config, mqtt_url, plugin)


@app.command("status")
def rollout_status(
    wait: Annotated[float, typer.Option(min=0.1, help="Seconds to collect the devices' retained states.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    plugin: PluginName = None,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Per device (named by its topic): state, model (or plugin) served, the rollout's, the last reason,
    the report's age, and whether the device is stale (nothing heard for 3 status intervals)."""
    import json

    from rich.console import Console

    from edgefleet import fleet_rollout as rollout

    with reported("rollout status", ValueError):  # a bad plugin name
        rows = rollout.rows(_fleet(config, mqtt_url), wait, plugin=plugin)
    if json_out:
        for row in rows:
            typer.echo(json.dumps(row.as_json()))
        return
    console = Console()
    # Piped into grep or a file there is no terminal width to respect: one row per line.
    title = "edgefleet rollout status" + (f" --plugin {plugin}" if plugin else "")
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(status_table(rows, title))


def _fleet(config: Path | None, mqtt_url: str | None) -> CommonSettings:
    return load_settings(CommonSettings, config, mqtt_url=mqtt_url)


def _signed_settings(config: Path | None, mqtt_url: str | None, name: str, version: int, keys_dir: Path,
                     plugin: bool) -> tuple[StoreSettings, int]:
    """The fleet's and the registry's settings, once the model's (or plugin's) version is known to be in
    the registry signed by one of the keys in `keys_dir`: every device would refuse it otherwise; and the
    size of its artifact (as its signed manifest says: what sizes the pacing).

    Raises:
        typer.Exit: 2 when the version is not published and signed by a trusted key (or no key can be
            read); 1 for a bad name or version, or a registry that cannot be asked.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from edgefleet.publish import NotPublished, signed_model, signed_plugin, trusted_keys
    from shared import s3

    settings = load_settings(StoreSettings, config, mqtt_url=mqtt_url)
    # None there, or a file that is no public key (SignatureError, ValueError), or unreadable.
    with reported("rollout start: refused (--trusted-keys, EDGEFLEET_TRUSTED_KEYS_DIR)", NotPublished, ValueError,
                  OSError, code=2):
        trusted = trusted_keys(keys_dir)
    signed = signed_plugin if plugin else signed_model
    with (reported("rollout start (the registry: EDGEFLEET_S3_*)", ValueError, ClientError, BotoCoreError),
          reported("rollout start: refused", NotPublished, code=2)):
        manifest = signed(s3.client(settings), settings.registry_bucket, name, version, trusted)
    return settings, manifest.size_bytes


def _change(phase_name: str, config: Path | None, mqtt_url: str | None, plugin: str | None = None) -> None:
    from edgefleet import fleet_rollout as rollout
    from shared.schemas import RolloutPhase

    # The broker unreachable, no rollout to change; ValueError: a bad plugin name.
    with reported("rollout", EdgefleetError, ValueError):
        changed = rollout.change_phase(_fleet(config, mqtt_url), RolloutPhase(phase_name), plugin)
    typer.echo(f"rollout {changed.rollout_id}: {phase_name}", err=True)


def status_table(rows: list[DeviceRow], title: str = "edgefleet rollout status") -> Table:
    """One row per device: its rollout, state, the model served and the target, the last reason, age, health."""
    from rich.table import Table

    table = Table(title=title)
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
