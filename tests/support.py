"""What the tests share: services as real child processes, and an MQTT client that
collects what the device publishes. Everything talks to real Mosquitto brokers."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pydantic import BaseModel

from edgefleet.spawner import Child
from edgefleet.waiting import wait_until
from shared import metrics, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import CommonSettings
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Encoding, ErrorReport, FrameEnvelope, Prediction, ServiceStatus, SyncReport


class Device:
    """A test's view of one device on a broker: publishes frames, collects predictions, errors and
    statuses. Reconnects by itself, like the services, through the same MqttLink."""

    def __init__(self, url: str, device_id: str) -> None:
        self.device_id = device_id
        settings = CommonSettings(mqtt_url=url, device_id=device_id, mqtt_reconnect_max_s=1)
        self.link = MqttLink(settings, "test", unique=True)
        self.predictions: list[Prediction] = []
        self.content_types: list[str | None] = []
        self.errors: list[ErrorReport] = []
        self.statuses: list[ServiceStatus] = []
        self.undecodable: list[bytes] = []
        self.sync_reports: list[SyncReport] = []
        self._lock = threading.Lock()
        self.link.subscribe(topics.sync_state(device_id), self._on_sync_report)
        self.link.subscribe(topics.all_predictions(device_id), self._on_prediction)
        self.link.subscribe(topics.errors(device_id), self._on_error)
        self.link.subscribe(topics.all_status(device_id), self._on_status)
        self.link.start()
        assert self.link.wait_connected(10), "test client could not connect"

    def _on_prediction(self, message) -> None:
        with self._lock:
            self.content_types.append(content_type_of(message))
            try:
                self.predictions.append(decode(Prediction, message.payload, content_type_of(message)))
            except DecodeError:
                self.undecodable.append(message.payload)

    def _on_sync_report(self, message) -> None:
        with self._lock:
            self.sync_reports.append(decode(SyncReport, message.payload, content_type_of(message)))

    def sync_report(self, matches: Callable[[SyncReport], bool], what: str, timeout: float = 60) -> SyncReport:
        def find():
            with self._lock:
                return next((r for r in self.sync_reports if matches(r)), None)

        return wait_until(find, timeout, what)

    def sync_states(self, rollout_id: str) -> list[str]:
        with self._lock:
            states = [r.state.value for r in self.sync_reports if r.rollout_id == rollout_id]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def _on_error(self, message) -> None:
        with self._lock:
            self.errors.append(decode(ErrorReport, message.payload, content_type_of(message)))

    def _on_status(self, message) -> None:
        with self._lock:
            self.statuses.append(decode(ServiceStatus, message.payload, content_type_of(message)))

    def publish_frame(self, camera: str, payload: bytes, qos: int = 1) -> None:
        info = self.link.publish(topics.frames(self.device_id, camera), payload, qos=qos)
        if qos:
            info.wait_for_publish(10)

    def publish_envelope(self, camera: str, frame_id: str, data: bytes, qos: int = 1) -> None:
        encoding = Encoding.PNG if data.startswith(b"\x89PNG") else Encoding.JPEG
        envelope = FrameEnvelope(frame_id=frame_id, encoding=encoding, data=data, captured_at=time.time())
        self.publish_frame(camera, encode(envelope, WireFormat.MSGPACK), qos)

    def prediction_for(self, frame_id: str, timeout: float = 30) -> Prediction:
        def find():
            with self._lock:
                return next((p for p in self.predictions if p.frame_id == frame_id), None)

        return wait_until(find, timeout, f"a prediction for frame {frame_id}")

    def error_for(self, camera: str, timeout: float = 30) -> ErrorReport:
        def find():
            with self._lock:
                return next((e for e in self.errors if e.camera == camera), None)

        return wait_until(find, timeout, f"an error report for camera {camera}")

    def errors_of(self, reason: str) -> list[ErrorReport]:
        """The error reports received so far with this reason."""
        with self._lock:
            return [e for e in self.errors if e.reason == reason]

    def latest_status(self, service: str = "inference") -> ServiceStatus | None:
        with self._lock:
            return next((s for s in reversed(self.statuses) if s.service == service), None)

    def close(self) -> None:
        self.link.stop()


class Services:
    """The services one test started, each logging to `<folder>/<name>.log`. `close` kills them all
    (SIGKILL: a test's end need not be graceful) and, when the test failed, prints the end of each
    log for whoever reads it."""

    def __init__(self, folder: Path, request) -> None:
        self.folder, self._request = folder, request
        self.started: list[ServiceProcess] = []

    def start(self, settings: BaseModel, name: str, service: str = "inference") -> ServiceProcess:
        process = ServiceProcess(settings, self.folder / f"{name}.log", service)
        self.started.append(process)
        return process

    def close(self, tail: int = 5000) -> None:
        call = getattr(self._request.node, "rep_call", None)
        for process in self.started:
            process.kill()
            if call is not None and call.failed:
                print(f"--- {process.log_path}\n{process.log()[-tail:]}")


class ServiceProcess(Child):
    """`edgefleet <service>` as a child process, the command the containers run, started as every
    launcher starts one (edgefleet/spawner.py), with what tests look at besides.

    Args:
        settings: the service's typed settings (`config.load(SyncSettings, None, device_id=...)`), or
            the EDGEFLEET_* strings themselves where a test hands the service a raw or bad value on
            purpose, to see it refuse it.
        log_path: its log file.
        service: the command.
    """

    def __init__(self, settings: BaseModel | Mapping[str, str], log_path: Path, service: str = "inference") -> None:
        if isinstance(settings, BaseModel):
            super().__init__(service, log_path, settings)
        else:
            super().__init__(service, log_path, env=settings)

    @property
    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def terminate(self, timeout: float = 60) -> int:
        """Stops it the one way (SIGTERM, SIGKILL after `timeout`); returns its exit status."""
        return self.stop(timeout)


def zlib_bomb(inflated_mib: int) -> bytes:
    """A zlib stream (first byte 0x78) that inflates to `inflated_mib` MiB of zeros, without compressing
    them all: a full flush makes each 1 MiB block stand alone, so one block repeated is a valid stream
    (its end and checksum left out: an inflater refusing it at a cap never gets there)."""
    packer = zlib.compressobj(9)
    first = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    return first + block * (inflated_mib - 1)


CONTAINER_UID = 10001  # the user the images run the services as (Dockerfile)


def unreadable_by(uid: int, *paths: Path) -> list[str]:
    """The paths another user cannot read (empty: all readable). Checked by really reading them as that
    user (`cat` run with its uid and gid; needs root), so folder modes on the way count too."""
    blocked = []
    for path in paths:
        result = subprocess.run(["cat", str(path)], user=uid, group=uid, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            blocked.append(f"{path}: {result.stderr.strip()}")
    return blocked


# -- Prometheus metrics scraped over HTTP from a real service (tests/test_metrics.py,
#    tests/test_telemetry_metrics_scrape.py) -----------------------------------------------------------

INFO_FAMILIES = (metrics.SERVICE_INFO, metrics.MODEL_INFO)


def metrics_url(service: ServiceProcess) -> str:
    """The address the service logged for its endpoint (it asked for EDGEFLEET_METRICS_PORT=0: any free one)."""
    def logged() -> str | None:
        found = re.search(r"metrics at (http://[\d.]+:\d+/metrics)", service.log())
        return found.group(1) if found else None

    url = wait_until(lambda: logged() or (None if service.alive() else "exited"), 60, "the metrics address")
    assert url != "exited", service.log()
    return url


def scrape(url: str) -> dict[str, list[Sample]]:
    """One scrape: samples by family name as the text format declares it (info: name_info; counter: no _total)."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 the service's own http://127.0.0.1 endpoint
        assert response.status == 200
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def metric_family(scraped: dict[str, list[Sample]], name: str) -> list[Sample]:
    """A family's samples by its shared.metrics name. KeyError: the family is not served at all."""
    return scraped[f"{name}_info" if name in INFO_FAMILIES else name.removesuffix("_total")]


def check_metric_families(scraped: dict[str, list[Sample]], families: tuple[str, ...], device: str, *,
                          with_samples: bool = True) -> None:
    """Every family is served (with samples, unless with_samples is False: a labelled family with no
    child yet), each sample labelled with the device."""
    for name in families:
        samples = metric_family(scraped, name)
        labelled = all(s.labels.get(metrics.DEVICE_LABEL) == device for s in samples)
        assert (samples or not with_samples) and labelled, (name, samples)


def client_link(url: str) -> MqttLink:
    """A plain client of the broker at `url` for a test to publish or read with (not started)."""
    return MqttLink(CommonSettings(mqtt_url=url, device_id="test"), "test", unique=True)


def retained(url: str, topic: str, kind: type[BaseModel], wait_s: float = 2.0) -> BaseModel | bytes | None:
    """The message retained on `topic`, read by a real subscriber: decoded as `kind`, its raw bytes where it
    does not decode, None if none came within wait_s."""
    got: list[BaseModel | bytes] = []

    def on_message(message) -> None:
        if message.payload:
            try:
                got.append(decode(kind, message.payload, content_type_of(message)))
            except DecodeError:
                got.append(message.payload)

    link = client_link(url)
    link.subscribe(topic, on_message)
    link.start()
    try:
        assert link.wait_connected(10)
        deadline = time.monotonic() + wait_s
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        link.stop()
    return got[-1] if got else None
