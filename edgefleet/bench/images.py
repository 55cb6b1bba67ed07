"""`edgefleet bench images`: what the shipped images cost. For every image scripts/images.sh builds:
its size and, where it is built on a local stand-in for python:3.11-slim, the size it will have on
the real base; for each service image, the cold start from `docker run` to `healthy` and its resident
memory once idle.

Sizes. A project image is the base's layers plus its own; its own layers are the same on either base
(the same venv copied in), so on the real base it is `own layers + real base`. The real
python:3.11-slim (linux/amd64, bookworm) is taken as 130 MB uncompressed, as `docker images` lists it
in most published listings (120-131 MB across patch releases, one 154 MB; Docker Hub shows the ~45 MB
compressed download instead): Docker Hub is not reachable here to measure it. --real-base-mb changes
the figure. The stand-in (Debian's python3 with pip and venv) is
larger, so the stand-in figure is an upper bound.

Start-up. Each service runs alone with the settings compose gives it (--init, read-only root, /tmp
on tmpfs, no capabilities; anonymous volumes where compose mounts named ones), on the host network,
against a Mosquitto and a moto S3 server the bench starts on loopback, with the image's HEALTHCHECK
as shipped (every 5 s): "healthy" is what a user waits for. "online" is when the service's retained
ONLINE status reached the broker (for the camera, its first frame). The page cache is warm (the image was just
built or run): a first pull onto a device adds its download.

Goals: the inference image <= 500 MB on the real slim base; inference healthy <= 10 s
from `docker run`.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from edgefleet.bench import containers
from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from edgefleet.progress import QUIET, Reporter
from edgefleet.s3server import S3Server
from edgefleet.spawner import keys_of
from shared import topics
from shared.codec import decode
from shared.config import (
    CameraSettings,
    CommonSettings,
    InferenceSettings,
    IngestSettings,
    SyncSettings,
    TelemetrySettings,
    load,
)
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import ServiceState, ServiceStatus

TAG = "latest"
BASE = "python:3.11-slim"
REAL_SLIM_MB = 130.0  # see the module's doc
DEVICE = "efh-bench"
STANDIN_LABEL = containers.STANDIN_LABEL
MB, MIB = 10**6, 2**20
# (image target, the service's status name; None: no health check, readiness is its first frame)
SERVICES = [("inference", "inference"), ("sync", "sync"), ("telemetry", "telemetry"),
            ("cloud-ingest", topics.INGEST_SERVICE), ("camera", None)]
STANDINS = [BASE, "eclipse-mosquitto:2.0", f"edgefleet/s3-standin:{TAG}"]
MODEL_MOUNT = "/models/efficientnet-lite0"
# compose's x-service settings (docker-compose.yml), as docker run flags; /tmp is the container's own
# tmpfs, no file of this machine.
HARDENING = ["--init", "--read-only", "--tmpfs", "/tmp",  # noqa: S108
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true"]


def run(quick: bool, json_out: Path | None, model_dir: Path, build: bool = True, real_base_mb: float = REAL_SLIM_MB,
        services: list[str] | None = None, *, progress: Reporter = QUIET) -> int:
    """services: the image targets whose start-up is measured (default: every service; sizes are always all);
    progress: shown the build and each service's start."""
    unknown = set(services or ()) - {target for target, _ in SERVICES}
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}: choose from {[t for t, _ in SERVICES]}")
    missing = containers.engine_missing()
    if missing is not None:
        print(missing)
        rows = [{"image": "(none)", "note": missing}]
        goals = [Goal("inference image on the real slim base", math.nan, 500, "MB", "max"),
                 Goal("inference healthy after docker run", math.nan, 10, "s", "max")]
        emit("images", quick, rows, goals, json_out, progress=progress)
        return 1
    if build:
        with progress.task("scripts/images.sh (cached builds)"):
            print(f"scripts/images.sh: {containers.build_images():.0f} s")
    rows = _sizes(real_base_mb)
    starts = _starts(model_dir, 3.0 if quick else 10.0, services or [target for target, _ in SERVICES], progress)
    for row in rows:
        row.update(starts.pop(row["image"], {}))
    rows += [{"image": name, **row} for name, row in starts.items()]  # the variants (see _starts)
    inference = next(r for r in rows if r["image"] == f"edgefleet/inference:{TAG}")
    goals = [
        Goal("inference image on the real slim base", _number(inference.get("MB on real base")), 500, "MB", "max"),
        Goal("inference healthy after docker run", _number(inference.get("healthy s")), 10, "s", "max"),
    ]
    print(f"real {BASE} taken as {real_base_mb:g} MB (--real-base-mb); stand-in inference image: {inference['MB']} MB")
    return emit("images", quick, rows, goals, json_out, progress=progress)


def _sizes(real_base_mb: float) -> list[dict]:
    """One row per image: its size, and on the real base where it is built on the stand-in."""
    base = containers.inspect_image(BASE)
    base_is_standin = base is not None and STANDIN_LABEL in (base["Config"].get("Labels") or {})
    rows = []
    for tag in [f"edgefleet/{target}:{TAG}" for target, _ in SERVICES] + STANDINS:
        image = containers.inspect_image(tag)
        if image is None:
            rows.append({"image": tag, "MB": "missing", "base": "", "MB on real base": ""})
            continue
        size = image["Size"]
        row = {"image": tag, "MB": round(size / MB, 1)}
        # (Labels are inherited: every image built FROM the stand-in carries its label; the layers tell.)
        if base is not None and tag != BASE and _built_on(image, base):
            own = size - base["Size"]
            kind = "stand-in for minio/minio: " if tag in STANDINS else ""
            row.update({"base": f"{kind}{BASE} ({'stand-in' if base_is_standin else 'real'}) + {own / MB:.1f} MB own",
                        "MB on real base": round((own + real_base_mb * MB) / MB if base_is_standin else size / MB, 1)})
        elif STANDIN_LABEL in (image["Config"].get("Labels") or {}):
            row.update({"base": f"stand-in from Debian ({image['Config']['Labels'][STANDIN_LABEL]})",
                        "MB on real base": f"{real_base_mb:g} (taken)" if tag == BASE else ""})
        else:
            row.update({"base": "pulled" if tag in STANDINS else "?", "MB on real base": ""})
        rows.append(row)
    return rows


def _built_on(image: dict, base: dict) -> bool:
    layers, base_layers = image["RootFS"]["Layers"], base["RootFS"]["Layers"]
    return layers[: len(base_layers)] == base_layers



def _number(value: object) -> float:
    """A goal's value; nan (never met) where it was not measured."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _starts(model_dir: Path, idle_s: float, targets: list[str], progress: Reporter = QUIET) -> dict[str, dict]:
    """Per service image: seconds from docker run to online and to healthy, resident MiB after idle_s; one
    progress unit per service."""
    model_dir = model_dir.resolve()
    if not (model_dir / "model.onnx").exists():
        raise FileNotFoundError(f"no model in {model_dir}: run `edgefleet model build` first")
    out = {}
    with ExitStack() as stack:
        broker, store = stack.enter_context(Broker()), stack.enter_context(S3Server())
        seen = _Seen(broker.url)
        stack.callback(seen.link.stop)
        chosen = [(t, s) for t, s in SERVICES if t in targets]
        with progress.task(f"starting {len(chosen)} service containers, each until healthy", len(chosen)) as started:
            for target, service in chosen:
                out[f"edgefleet/{target}:{TAG}"] = _start(target, service, broker, store, model_dir, seen, idle_s)
                started.advance()
    return out


class _Seen:
    """When each service's ONLINE status, and the camera's first frame, reached the broker."""

    def __init__(self, url: str) -> None:
        self.at: dict[str, float] = {}
        self.events: dict[str, threading.Event] = {}
        self.link = MqttLink(CommonSettings(mqtt_url=url, device_id=DEVICE), "bench", unique=True)
        self.link.subscribe(topics.all_status(DEVICE), self._on_status)
        # cloud_ingest's status names its replica (<device id>-<host name>), not the device id
        self.link.subscribe(topics.every_device_status(topics.INGEST_SERVICE), self._on_status)
        self.link.subscribe(topics.all_frames(DEVICE), lambda m: self._mark("camera"))
        self.link.start()
        if not self.link.wait_connected(10):
            raise RuntimeError("the bench could not reach its own broker")

    def expect(self, name: str) -> threading.Event:
        self.at.pop(name, None)
        self.events[name] = threading.Event()
        return self.events[name]

    def _on_status(self, message) -> None:
        status = decode(ServiceStatus, message.payload, content_type_of(message))
        if status.state is ServiceState.ONLINE:
            self._mark(topics.last_level(message.topic))

    def _mark(self, name: str) -> None:
        if name in self.events and name not in self.at:
            self.at[name] = time.perf_counter()
            self.events[name].set()


def _settings(target: str, broker: Broker, store: S3Server) -> CommonSettings:
    """The service's settings: the bench's broker and S3 store, the model where the volume mounts it."""
    common = {"mqtt_url": broker.url, "device_id": DEVICE}
    if target == "inference":
        return load(InferenceSettings, None, **common, model_dir=MODEL_MOUNT)
    if target == "sync":
        return load(SyncSettings, None, **{**keys_of(store.settings()), **common}, seed_model_dir=MODEL_MOUNT)
    if target == "telemetry":
        return load(TelemetrySettings, None, **common, cloud_mqtt_url=broker.url)
    if target == "cloud-ingest":
        return load(IngestSettings, None, **{**keys_of(store.settings()), **common})
    return load(CameraSettings, None, **common)


def _start(target: str, service: str | None, broker: Broker, store: S3Server, model_dir: Path, seen: _Seen,
           idle_s: float) -> dict:
    flags = list(HARDENING)
    args: list[str] = []
    if target == "inference":
        flags += ["-v", f"{model_dir}:{MODEL_MOUNT}:ro"]
    elif target == "sync":
        flags += ["-v", f"{model_dir}:{MODEL_MOUNT}:ro", "-v", "/var/lib/edgefleet/store"]
    elif target == "telemetry":
        flags += ["-v", "/var/lib/edgefleet/telemetry"]
    elif target == "camera":
        args = ["camera", "--cameras", "cam-1", "--rate", "2"]  # compose's command
    settings = _settings(target, broker, store)
    online = seen.expect(service or "camera")
    with ExitStack() as stack:
        t0 = time.perf_counter()
        container = containers.run(stack, f"edgefleet/{target}:{TAG}", target, settings, args=args, docker_args=flags)
        row: dict = {}
        if service is not None:
            row["healthy s"] = round(containers.wait_healthy(container, 90) - t0, 2)
        if not online.wait(90):
            raise RuntimeError(f"{target} never came online:\n{container.logs()}")
        row["online s"] = round(seen.at[service or "camera"] - t0, 2)
        if service is None:
            row["healthy s"] = "no check"
        time.sleep(idle_s)
        resident, source = container.resident_bytes()
        row[f"resident MiB after {idle_s:g} s idle"] = round(resident / MIB, 1)
        print(f"{target}: {row} (memory: {source})")
        return row
