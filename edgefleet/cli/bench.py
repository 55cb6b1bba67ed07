"""`edgefleet bench ...`: each benchmark prints its table and writes JSON with its goals
(edgefleet/bench/report.py), showing its progress while it runs and ending with one summary line
(edgefleet/progress.py); the measuring is in edgefleet/bench/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cli.common import BenchJson, comma_list
from edgefleet.progress import shown
from shared.config import DEFAULT_MODEL_DIR

app = typer.Typer(no_args_is_help=True, help="Benchmarks: each prints a table and writes JSON with its goals.")


@app.command("pipeline")
def bench_pipeline(
    quick: Annotated[bool, typer.Option(help="Less data; finishes within a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The FP32 model to measure.")] = DEFAULT_MODEL_DIR,
    int8_dir: Annotated[Path | None, typer.Option(
        help="The static INT8 model (default: <model>-int8-static-minmax beside it, built there if missing).")] = None,
    pin: Annotated[bool, typer.Option(
        help="Pin the camera and subscriber to one core, the broker and the service to another.")] = True,
    scene_change_s: Annotated[float, typer.Option(
        min=0.1, help="The static-camera stream cuts to another photo this often, in seconds.")] = 3.0,
    noise: Annotated[float, typer.Option(
        min=0, max=64, help="Sensor noise of the static-camera stream: standard deviation in grey levels.")] = 2.0,
) -> None:
    """The whole MQTT path against the tightest loop doing the same work on the same core (FP32, INT8, the
    cascade), and the scene cache on a static-camera stream and on changing frames."""
    from edgefleet.bench import pipeline

    with shown() as progress:
        code = pipeline.run(quick=quick, json_out=json_out, model_dir=model_dir, pin=pin,
                            change_every_s=scene_change_s, noise_sigma=noise, int8_dir=int8_dir, progress=progress)
    raise typer.Exit(code)


@app.command("compression")
def bench_compression(
    quick: Annotated[bool, typer.Option(help="Less data; finishes within a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The float model.")] = DEFAULT_MODEL_DIR,
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads for every model (0: all cores).")] = 1,
) -> None:
    """FP32 against static and dynamic INT8, quantized and measured in one run on held-out real images."""
    from edgefleet.bench import compression

    with shown() as progress:
        code = compression.run(quick=quick, json_out=json_out, model_dir=model_dir, threads=threads, progress=progress)
    raise typer.Exit(code)


@app.command("swap")
def bench_swap(
    quick: Annotated[bool, typer.Option(help="A shorter stream; about half a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(
        help="The model swapped in and out (with a rebuilt copy of itself).")] = DEFAULT_MODEL_DIR,
    rate: Annotated[float, typer.Option(min=1, help="Frames per second offered throughout.")] = 100.0,
) -> None:
    """Frames through inference while 20 hot swaps happen, against the same stream without: drops, gaps, memory."""
    from edgefleet.bench import hotswap

    with shown() as progress:
        code = hotswap.run(quick, json_out, model_dir, rate, progress=progress)
    raise typer.Exit(code)


@app.command("overload")
def bench_overload(
    quick: Annotated[bool, typer.Option(help="A shorter overload; about half a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model to serve.")] = DEFAULT_MODEL_DIR,
    factor: Annotated[float, typer.Option(
        min=2, help="Offered rate, as a multiple of the sustainable rate measured first.")] = 10.0,
) -> None:
    """Ten times the sustainable rate against the sustainable rate itself, in one run: latency growth, memory
    growth, counters."""
    from edgefleet.bench import overload

    with shown() as progress:
        code = overload.run(quick, json_out, model_dir, factor, progress=progress)
    raise typer.Exit(code)


@app.command("telemetry")
def bench_telemetry(
    quick: Annotated[bool, typer.Option(help="Smaller volumes; about a minute.")] = False,
    json_out: BenchJson = None,
    contained: Annotated[bool, typer.Option("--containers/--no-containers", help="Also measure 1, 2 and 4 cloud_ingest "
        "containers at --cpus 0.25 each (needs a Docker engine; without one the rows say so).")] = True,
    build: Annotated[bool, typer.Option(help="Run scripts/images.sh cloud-ingest first (cached).")] = True,
) -> None:
    """Outbox writes against raw SQLite, backlog drain to S3, cloud_ingest two replicas against one, and 1/2/4
    containers."""
    from edgefleet.bench import telemetry

    with shown() as progress:
        code = telemetry.run(quick, json_out, contained, build, progress=progress)
    raise typer.Exit(code)


@app.command("images")
def bench_images(
    quick: Annotated[bool, typer.Option(
        help="A shorter idle before memory is read; about a minute once built.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(
        help="The model the inference container serves (mounted read-only).")] = DEFAULT_MODEL_DIR,
    build: Annotated[bool, typer.Option(
        help="Run scripts/images.sh first (cached builds; stand-ins made where missing).")] = True,
    real_base_mb: Annotated[float, typer.Option(
        min=1, help="Size of the real python:3.11-slim, uncompressed, in MB.")] = 130.0,
    services: Annotated[str | None, typer.Option(
        help="Only these services' start-up, comma-separated (default: all).")] = None,
) -> None:
    """Every image's size (and on the real slim base), each service container's cold start to healthy, its idle
    memory."""
    from edgefleet.bench import images

    only = comma_list(services) if services else None
    try:
        with shown() as progress:
            code = images.run(quick, json_out, model_dir, build, real_base_mb, only, progress=progress)
    except ValueError as exc:  # an unknown service: a usage error of --services
        raise typer.BadParameter(str(exc), param_hint="--services") from None
    raise typer.Exit(code)


@app.command("ep")
def bench_ep(
    quick: Annotated[bool, typer.Option(help="Fewer runs per provider.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model to run.")] = DEFAULT_MODEL_DIR,
    providers: Annotated[str, typer.Option(help="Providers to try, comma-separated.")] = "tensorrt,cuda,openvino,cpu",
) -> None:
    """Which execution providers this machine has, latency on each, and every fallback said out loud."""
    from edgefleet.bench import ep

    with shown() as progress:
        code = ep.run(quick, json_out, model_dir, comma_list(providers), progress=progress)
    raise typer.Exit(code)


@app.command("cascade")
def bench_cascade(
    quick: Annotated[bool, typer.Option(help="48 held-out images, shorter timings; about a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The FP32 model (stage 2; stage 1 is its static INT8).")] = (
        DEFAULT_MODEL_DIR),
    work: Annotated[Path | None, typer.Option(
        help="Where the INT8 model, the cascade and (without var/data) the data set are built and reused "
             "(default: var/bench/cascade, or var/bench/cascade-quick).")] = None,
) -> None:
    """INT8 in front of FP32, threshold chosen on held-out images: agreement and mean model time against FP32."""
    from edgefleet.bench import cascade

    with shown() as progress:
        code = cascade.run(quick, json_out, model_dir, work, progress=progress)
    raise typer.Exit(code)


@app.command("wasm")
def bench_wasm(
    quick: Annotated[bool, typer.Option(help="Fewer repeats and shorter rounds; about half a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model the service serves beside the plugin.")] = (
        DEFAULT_MODEL_DIR),
) -> None:
    """A WebAssembly plugin's cold start, per-prediction cost against Python, memory, and the service's
    throughput with it against without (the plugins: scripts/plugins.sh)."""
    from edgefleet.bench import wasm

    with shown() as progress:
        code = wasm.run(quick, json_out, model_dir, progress=progress)
    raise typer.Exit(code)


@app.command("fleet")
def bench_fleet(
    quick: Annotated[bool, typer.Option(help="50 devices, short phases; about a minute and a half.")] = False,
    json_out: BenchJson = None,
    devices: Annotated[int | None, typer.Option(min=2, help="Simulated devices (default 1000; --quick 50).")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Simulator processes sharing the devices (default: 1 up to 200 devices, else 2 per 1000).")] = None,
    telemetry_s: Annotated[float | None, typer.Option(
        min=5, help="The telemetry window, seconds (default 120; --quick 20).")] = None,
    cut_for_s: Annotated[float | None, typer.Option(
        min=1, help="How long 10 % of the links are cut inside it (default 60; --quick 8).")] = None,
    records_per_s: Annotated[float | None, typer.Option(min=0.1, help=(
        "Telemetry records per second per device (default 5.1: a little over the goal's 5, so that a pipeline "
        "keeping up shows it)."))] = None,
    model_bytes: Annotated[int, typer.Option(
        min=4096, help="The rolled-out ONNX model's weights, bytes (a real model made for the bench).")] = 1 << 20,
    max_concurrent_downloads: Annotated[int, typer.Option(
        min=0, help="The rollout's pacing: about this many devices download at once (0: no pacing).")] = 50,
) -> None:
    """A fleet of simulated devices on one TLS fleet broker, two cloud_ingest replicas and S3: connect, telemetry
    with 10 % of the links cut (records/s, lag, audit), then a canary rollout and its promote (time to active,
    registry traffic), with the broker's and the replicas' CPU."""
    from edgefleet.bench import fleet

    plan = fleet.plan_for(quick, devices, processes, telemetry_s, cut_for_s, records_per_s, model_bytes,
                          max_concurrent_downloads)
    with shown() as progress:
        code = fleet.run(quick, json_out, plan, progress=progress)
    raise typer.Exit(code)
