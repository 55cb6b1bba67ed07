"""`edgefleet simulate run|record`: simulated devices on the fleet broker, many per process, speaking the
real protocol (edgefleet/simulate/); and the recording of the real model's predictions they draw from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cli.common import ConfigFile, fail, load_settings, reported
from shared import logs
from shared.config import DEFAULT_MODEL_DIR, SyncSettings, TelemetrySettings, describe_keys

app = typer.Typer(help="Simulated devices on the fleet broker, and the predictions they draw from.",
                  no_args_is_help=True, epilog=describe_keys(SyncSettings))

PredictionsFile = Annotated[Path, typer.Option(
    "--predictions", help="The recorded predictions (written by `edgefleet simulate record`).")]


@app.command("run")
def run(
    devices: Annotated[int, typer.Option(min=1, help="Devices this process simulates.")],
    fleet_url: Annotated[str, typer.Option(help="The fleet broker, mqtts://HOST:PORT.")],
    certs: Annotated[Path, typer.Option(
        help="The fleet CA's folder (ca.crt, ca.key): <device>.crt/.key are issued there if missing.")],
    trusted_keys: Annotated[Path, typer.Option(help="Operator public keys (*.pub) the devices trust.")],
    seed_model: Annotated[Path, typer.Option(help="The model every device starts with (its fallback).")],
    first: Annotated[int, typer.Option(min=0, help="The first device's number.")] = 0,
    prefix: Annotated[str, typer.Option(help="Device ids are <prefix>-<number, 5 digits>.")] = "sim",
    records_per_s: Annotated[float, typer.Option(min=0, help="Telemetry records a second per device (0: none).")] = 5.0,
    predictions_per_s: Annotated[float, typer.Option(min=0, help="Predictions a second per device (canary).")] = 20.0,
    connect_spread_s: Annotated[float, typer.Option(min=0, help="Connects are spread over this many seconds.")] = 5.0,
    cut_share: Annotated[float, typer.Option(min=0, max=1, help="Share of the devices whose link is cut.")] = 0.0,
    cut_at_s: Annotated[float, typer.Option(min=0, help="Seconds after all devices connected to cut.")] = 0.0,
    cut_for_s: Annotated[float, typer.Option(min=0, help="How long a cut link stays down.")] = 60.0,
    cut_mode: Annotated[str, typer.Option(
        help="silent: a WAN cut (the broker hears nothing until keepalive or the reconnect); fin: the TCP "
             "connection is shut down (the broker learns at once).")] = "silent",
    stats: Annotated[Path | None, typer.Option(help="A JSON file rewritten every second (simulate/stats.py).")] = None,
    duration_s: Annotated[float, typer.Option(min=0, help="Seconds to run; 0: until SIGTERM.")] = 0.0,
    state_dir: Annotated[Path | None, typer.Option(
        help="The devices' folders (default: a fresh folder under /dev/shm, removed at exit).")] = None,
    keep_state: Annotated[bool, typer.Option(help="Keep the default state folder at exit.")] = False,
    predictions: PredictionsFile = Path("var/simulate/predictions.json"),
    config: ConfigFile = None,
) -> None:
    """Simulate devices on the fleet broker until SIGTERM (statuses offline, clean disconnects, exit 0).
    SIGUSR1 drains: no more telemetry records, what the outboxes hold is still forwarded.
    The registry (S3) and the sync and telemetry settings come from the usual EDGEFLEET_* environment."""
    from urllib.parse import urlsplit

    from edgefleet.simulate.fleet import Options, Simulator, ensure_certificates
    from edgefleet.simulate.link import CutMode, Endpoint
    from shared.errors import EdgefleetError

    url = urlsplit(fleet_url)
    if url.scheme != "mqtts" or not url.hostname or not url.port:
        raise fail("simulate run", f"--fleet-url {fleet_url!r}: expected mqtts://HOST:PORT (the fleet broker is "
                   "TLS only)", code=2)
    if cut_mode not in {m.value for m in CutMode}:
        raise fail("simulate run", f"--cut-mode {cut_mode!r}: expected silent or fin", code=2)
    ids = [f"{prefix}-{i:05d}" for i in range(first, first + devices)]
    if not predictions.exists():  # recorded in a child process: the model run must not sit in the simulator's memory
        _record_in_child(predictions)
    with reported("simulate run", ValueError, OSError, EdgefleetError):
        ensure_certificates(certs, ids)
    settings = load_settings(SyncSettings, config, trusted_keys_dir=trusted_keys, seed_model_dir=seed_model)
    telemetry = load_settings(TelemetrySettings, config)
    logs.setup("simulate", f"{prefix}-{first:05d}+{devices}", settings.log.level, settings.log.format)
    options = Options(
        devices=ids, endpoint=Endpoint(url.hostname, url.port, certs), trusted_keys=trusted_keys,
        seed_model=seed_model, predictions_file=predictions, records_per_s=records_per_s,
        predictions_per_s=predictions_per_s, connect_spread_s=connect_spread_s, cut_share=cut_share,
        cut_at_s=cut_at_s, cut_for_s=cut_for_s, cut_mode=CutMode(cut_mode), stats=stats, duration_s=duration_s,
        state_dir=state_dir, keep_state=keep_state,
    )
    with reported("simulate run", OSError, EdgefleetError):
        raise typer.Exit(Simulator(options, settings, telemetry).run())


def _record_in_child(out: Path) -> None:
    """`edgefleet simulate record --predictions OUT` from the real model, in a child process.

    :raises typer.Exit: the recording failed (its output is shown).
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgefleet", "simulate", "record", "--predictions", str(out)],  # noqa: S603
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise fail("simulate run", f"no recorded predictions at {out}, and recording them failed:\n"
                   f"{done.stdout}{done.stderr}".rstrip(), code=1)


@app.command("record")
def record(
    model_dir: Annotated[Path, typer.Option(help="The real model to record.")] = DEFAULT_MODEL_DIR,
    out: PredictionsFile = Path("var/simulate/predictions.json"),
) -> None:
    """Run the real model once over the bundled photos and record each one's top-1 label, confidence and
    latencies: the distribution simulated devices draw their predictions from."""
    from edgefleet.simulate.predictions import record as run_record
    from shared.errors import EdgefleetError

    with reported("simulate record", OSError, EdgefleetError):
        recording = run_record(model_dir, out)
    typer.echo(f"{out}: {len(recording.predictions)} photos, {recording.model} v{recording.version}")
