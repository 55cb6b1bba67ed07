"""`edgefleet inference|sync|cloud-ingest|console|camera|health|up|fleet`: run one service, the camera
simulator, the containers' health check, or a whole local device or fleet. The telemetry service
starts from its own group (telemetry.py), which also holds its audit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cli.common import ConfigFile, check_environment, load_settings, reported
from edgefleet.waiting import WaitTimeout
from shared.config import (
    CameraSettings,
    ConfigError,
    ConsoleSettings,
    InferenceSettings,
    IngestSettings,
    SyncSettings,
    TelemetrySettings,
    describe_keys,
)

app = typer.Typer()


@app.command(epilog=describe_keys(InferenceSettings))
def inference(config: ConfigFile = None) -> None:
    """Run the inference service: frames in, predictions out. Configured by these keys:"""
    from services.inference.service import main

    raise typer.Exit(main(load_settings(InferenceSettings, config)))


@app.command(epilog=describe_keys(SyncSettings))
def sync(config: ConfigFile = None) -> None:
    """Run the sync service: rollouts in, verified models installed, canaries judged. Configured by these keys:"""
    from services.sync.service import main

    raise typer.Exit(main(load_settings(SyncSettings, config)))


@app.command("cloud-ingest", epilog=describe_keys(IngestSettings))
def cloud_ingest(config: ConfigFile = None) -> None:
    """Run a cloud_ingest replica: telemetry batches from the cloud broker into S3. Configured by these keys:"""
    from services.cloud_ingest.service import main

    raise typer.Exit(main(load_settings(IngestSettings, config)))


@app.command(epilog=describe_keys(ConsoleSettings))
def console(
    config: ConfigFile = None,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="The page's HTTP port (0: a free one, printed at start); EDGEFLEET_CONSOLE_PORT.",
    )] = None,
    host: Annotated[str | None, typer.Option(
        help="The address to listen on (0.0.0.0 in a container); EDGEFLEET_CONSOLE_HOST.")] = None,
) -> None:
    """Run the fleet console: a web page of every device (online or stale, model, sync state, pred/s, outbox,
    alerts), the rollouts and each device's drift and latency over time, updated live. Reads the fleet broker
    (EDGEFLEET_MQTT_*, certificate common name `console`) and the S3 telemetry. Configured by these keys:"""
    from services.console.service import main

    raise typer.Exit(main(load_settings(ConsoleSettings, config, console_port=port, console_host=host)))


@app.command()
def health(
    file: Annotated[Path, typer.Argument(help="The service's EDGEFLEET_HEALTH_FILE.")],
    max_age: Annotated[float, typer.Option(
        min=1, help="Seconds since the last healthy check before it counts as unhealthy.")] = 15.0,
    kill_after: Annotated[float | None, typer.Option(
        min=0, help="Also SIGKILL the service when its heartbeat has been silent for max-age + this many seconds "
        "(a frozen process), so its container exits and its restart policy brings it back. For containers run "
        "with an init (compose `init: true`): the service must not be PID 1.")] = None,
) -> None:
    """Exit 0 when the service was healthy within max-age (broker link up, every worker loop coming round):
    the containers' health check. Prints why not."""
    from shared.health import check_health

    ok, why = check_health(file, max_age, kill_after)
    typer.echo(why, err=not ok)
    raise typer.Exit(0 if ok else 1)


@app.command(epilog=describe_keys(CameraSettings))
def camera(
    config: ConfigFile = None,
    cameras: Annotated[str | None, typer.Option(help="Camera ids, comma-separated.")] = None,
    rate: Annotated[float | None, typer.Option(help="Frames per second per camera.")] = None,
    source: Annotated[str | None, typer.Option(
        help="bundled, a folder, an image, a video file or a device number.")] = None,
    envelope: Annotated[bool | None, typer.Option("--envelope/--raw", help="msgpack envelopes or raw bytes.")] = None,
    count: Annotated[int | None, typer.Option(help="Frames per camera, then stop (0: run on).")] = None,
) -> None:
    """Simulate cameras: publish real images at a fixed rate. Keys (flags override them):"""
    from edgefleet import camera as simulator
    from shared import logs

    settings = load_settings(CameraSettings, config, cameras=cameras, rate_hz=rate, source=source, envelope=envelope,
                             count=count)
    logs.setup("camera", settings.device_id, settings.log.level, settings.log.format)
    with reported("camera", ValueError, code=2):  # a source it cannot open
        raise typer.Exit(simulator.main(settings))


@app.command()
def up(
    cameras: Annotated[int, typer.Option(min=1, max=64, help="Simulated cameras.")] = 3,
    rate: Annotated[float, typer.Option(min=0.1, help="Frames per second per camera.")] = 2.0,
    device_id: Annotated[str, typer.Option(help="The device id.")] = "device-1",
    mqtt_url: Annotated[str | None, typer.Option(help="Use this broker instead of spawning one.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """The whole edge stack locally: broker, inference, cameras, and live predictions. Ctrl-C stops."""
    from edgefleet import stack

    check_environment(InferenceSettings, SyncSettings, CameraSettings, device_id=device_id, mqtt_url=mqtt_url)
    with reported("up", ConfigError, code=2), reported("up", WaitTimeout):
        code = stack.run(cameras, rate, device_id, mqtt_url, duration)
    raise typer.Exit(code)


@app.command()
def fleet(
    devices: Annotated[int, typer.Option(min=1, max=8, help="Simulated devices.")] = 2,
    rate: Annotated[float, typer.Option(min=0.1, help="Frames per second per camera (two cameras a device).")] = 2.0,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    folder: Annotated[Path, typer.Option(
        help="The fleet's certificates, model stores, outboxes and logs.")] = Path("var/fleet"),
) -> None:
    """The whole fleet locally: fleet broker (TLS), S3 store, cloud_ingest, and devices each with broker, sync,
    inference, telemetry and cameras."""
    from edgefleet import fleet as local_fleet

    check_environment(InferenceSettings, SyncSettings, CameraSettings, TelemetrySettings, IngestSettings,
                      ConsoleSettings)
    with reported("fleet", ConfigError, code=2), reported("fleet", WaitTimeout):
        code = local_fleet.run(devices, rate, duration, folder)
    raise typer.Exit(code)
