"""The benchmarks' side of a device: an inference service as a child process (the command the
containers run), one MQTT link that plays the cameras and collects the predictions, and the CPU
pinning that keeps the two apart.

On a machine with two or more cores the benches can split it in two: the "world" (the camera
simulator and the predictions subscriber, this process's threads) on one core, the "device" (the
Mosquitto broker and the inference service) on another, so the load generator never competes with
what it measures, as a real camera is another machine. Linux affinity is per thread and a new thread
or child inherits its creator's, so a child spawned while the calling thread is pinned starts pinned,
with every thread it later makes: the service then sizes its worker pool for the cores it really has.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import psutil

from edgefleet import photos
from edgefleet.broker import Broker
from edgefleet.spawner import Child
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import CommonSettings, InferenceSettings, load
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Encoding, FrameEnvelope, Prediction, ServiceState, ServiceStatus

DEVICE = "bench"
CAMERAS = ("cam-1", "cam-2", "cam-3", "cam-4")


# -- cores -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cores:
    """Where a bench runs: the world's core and the device's, or None for both when it cannot pin."""

    world: frozenset[int] | None
    device: frozenset[int] | None
    note: str

    @property
    def pinned(self) -> bool:
        return self.device is not None

    def label(self, device_only: bool = False) -> str:
        """'device 1' / 'world 0, device 1', or 'unpinned'."""
        if self.world is None or self.device is None:
            return "unpinned"
        device = f"device {_cpus(self.device)}"
        return device if device_only else f"world {_cpus(self.world)}, {device}"


def split_cores(pin: bool = True) -> Cores:
    """The world's and the device's cores: the first two this process may run on.

    Args:
        pin: False runs everything unpinned (as before pinning existed), said in the note.

    Returns:
        The split; on a one-core machine (or with pin False) both are None and the note says why.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if not pin:
        return Cores(None, None, f"not pinned (--no-pin): everything shares cores {_cpus(allowed)}")
    if len(allowed) < 2:
        return Cores(None, None, f"cannot pin: this process may use only core {_cpus(allowed)}; "
                                 "the world and the device share it")
    world, device = frozenset(allowed[:1]), frozenset(allowed[1:2])
    return Cores(world, device, f"world (camera, subscriber: this process) on core {_cpus(world)}; "
                                f"device (mosquitto, inference) on core {_cpus(device)}")


def pin_process(pid: int, cores: Iterable[int]) -> None:
    """Pins every thread a process has now (affinity is per thread; later threads inherit their creator's).

    Raises:
        OSError: the process is gone or may not be pinned there.
    """
    cores = set(cores)
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), cores)


def cores_of(pid: int) -> frozenset[int]:
    """The union of the cores every thread of a process may run on (what pinning really achieved)."""
    seen: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            seen |= os.sched_getaffinity(int(task))
    return frozenset(seen)


@contextlib.contextmanager
def on_cores(cores: Iterable[int] | None) -> Iterator[None]:
    """Pins the calling thread for the block (what it spawns inherits it), then restores its affinity.
    None leaves it as it is."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _cpus(cores: Iterable[int]) -> str:
    return ",".join(map(str, sorted(cores)))


# -- the cameras and the subscriber ------------------------------------------------------------------


class Result(NamedTuple):
    """One prediction as the harness received it."""

    received_at: float  # perf_counter
    e2e_s: float  # from the camera's publish() call to the prediction's arrival
    inference_ms: float  # the model's run, as the service timed it
    prediction: Prediction
    # From the frame on the wire (the camera's MQTT client reported its last byte written to its socket)
    # to the prediction's arrival: e2e_s less the camera's own client work, its packet built and paho's hop
    # to its network thread (0.21-0.28 ms p50 of this process's core at half load, 2026-12-07), which a
    # camera on another machine does there. Where the write was not seen, e2e_s itself: the larger figure,
    # so a missed report never flatters the path. No default: a result without it must not read as 0.
    wire_s: float


class Saturated(NamedTuple):
    """A closed loop's window: answers per second, the answers, and how much each meter moved."""

    per_s: float
    done: list[Result]
    metered: dict[str, float]


def cpu_seconds(pid: int) -> Callable[[], float]:
    """A meter: the CPU seconds (user and system, every thread) a process has used so far."""
    process = psutil.Process(pid)

    def read() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    return read


def core_busy_seconds(cores: Iterable[int]) -> Callable[[], float]:
    """A meter: the seconds these cores have been busy so far in processes or taken by the hypervisor
    (/proc/stat), so a bench can tell its own load from everything else's on a shared machine."""
    names = {f"cpu{c}" for c in cores}
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        busy = 0
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name in names:  # user nice system idle iowait irq softirq steal ...
                    values = list(map(int, fields))
                    # user, nice, system and steal (the hypervisor's): not irq and softirq, which on the
                    # device's core is mostly the path's own loopback traffic, not someone else's load
                    busy += sum(values[:3]) + values[7]
        return busy / tick

    return read


def bundled_frames() -> Iterator[tuple[str, bytes]]:
    """The camera simulator's stream: the bundled photos as JPEGs, round robin over CAMERAS, forever."""
    jpegs = itertools.cycle([photos.jpeg(n) for n in photos.BUNDLED])
    return ((CAMERAS[n % len(CAMERAS)], data) for n, data in zip(itertools.count(), jpegs))


class Harness:
    """The bench's cameras and predictions subscriber, on one MQTT link.

    `frames` is the stream sent, (camera, JPEG bytes) at a time (default: bundled_frames()); with
    `keep` set, every frame sent is kept by its id in `kept`, so a bench can run the model on it later.
    """

    def __init__(self, url: str) -> None:
        self.link = MqttLink(CommonSettings(mqtt_url=url, device_id=DEVICE), "bench", unique=True)
        self.frames: Iterator[tuple[str, bytes]] = bundled_frames()
        self.ids = itertools.count()
        self.sent: dict[str, float] = {}
        self.results: list[Result] = []
        self.kept: dict[str, bytes] = {}
        self.keep = False
        # When each frame went on the wire, by frame id; paho names a write by its message id, which
        # publish() returns only after paho's network thread may already have written the frame.
        self.written: dict[str, float] = {}
        self._writing: dict[int, str] = {}  # message id -> frame id, until written
        self._written_early: dict[int, float] = {}  # message id -> when written, until send() names it
        self.online = threading.Event()
        self.status: ServiceStatus | None = None  # the service's latest online status
        self.refill = False
        self.lock = threading.Lock()
        self.link.subscribe(topics.all_predictions(DEVICE), self._on_prediction)
        self.link.subscribe(topics.status(DEVICE, "inference"), self._on_status)
        self.link.client.on_publish = self._on_written  # QoS 0: once a frame's last byte is in the socket

    def send(self) -> None:
        """Publishes the stream's next frame in an envelope (QoS 0), its send time noted by its id."""
        frame_id = f"f{next(self.ids)}"
        camera, data = next(self.frames)
        frame = FrameEnvelope(frame_id=frame_id, encoding=Encoding.JPEG, data=data, captured_at=time.time())
        payload = encode(frame, WireFormat.MSGPACK)
        with self.lock:
            self.sent[frame_id] = time.perf_counter()
            if self.keep:
                self.kept[frame_id] = data
        info = self.link.publish(topics.frames(DEVICE, camera), payload, qos=0)
        if info.rc != paho.MQTT_ERR_SUCCESS:  # never written: its answer, if any, counts from the call
            return
        with self.lock:
            if (written := self._written_early.pop(info.mid, None)) is not None:
                self.written[frame_id] = written
            else:
                self._writing[info.mid] = frame_id

    def _on_written(self, client: paho.Client, userdata: object, mid: int, reason_code: object,
                    properties: object) -> None:
        now = time.perf_counter()
        with self.lock:
            if (frame_id := self._writing.pop(mid, None)) is not None:
                self.written[frame_id] = now
            else:
                self._written_early[mid] = now

    def paced(self, rate: float, seconds: float) -> None:
        """An open loop: frames at `rate` per second, spread evenly, for `seconds`."""
        period = 1.0 / rate
        t0 = next_send = time.perf_counter()
        while (now := time.perf_counter()) < t0 + seconds:
            if now >= next_send:
                self.send()
                next_send += period
            time.sleep(max(0.0, min(next_send - time.perf_counter(), 0.002)))

    def saturate(self, in_flight: int, seconds: float, warm_s: float = 1.0,
                 meters: Mapping[str, Callable[[], float]] | None = None) -> Saturated:
        """A closed loop: `in_flight` frames outstanding, each answer letting the next one in, so the
        service never idles and never drops, measured over `seconds` after `warm_s` of warm-up; the
        loop is drained before it returns.

        Args:
            in_flight: frames outstanding.
            seconds: the measured window.
            warm_s: the warm-up before it.
            meters: cumulative readings (a process's CPU seconds) taken at the window's two ends.
        """
        meters = meters or {}
        self.refill = True
        for _ in range(in_flight):
            self.send()
        time.sleep(warm_s)
        before = {name: read() for name, read in meters.items()}
        t0 = time.perf_counter()
        time.sleep(seconds)
        t1 = time.perf_counter()
        after = {name: read() for name, read in meters.items()}
        self.refill = False
        done = self.window(t0, t1)
        self.drain()
        return Saturated(len(done) / (t1 - t0), done, {name: after[name] - before[name] for name in meters})

    def drain(self, timeout_s: float = 10.0) -> None:
        """Waits until every frame sent has been answered (or `timeout_s`), so runs do not overlap."""
        self.settle(timeout_s)
        with self.lock:
            self.sent.clear()
            self.written.clear()
            self._writing.clear()
            self._written_early.clear()

    def settle(self, timeout_s: float) -> bool:
        """Waits until every frame sent has been answered, at most `timeout_s`; the unanswered stay in
        `sent` (a bench counts them as lost). A fixed sleep of `timeout_s` waited for the same answers,
        and on after the last had come.

        Returns:
            True once nothing is outstanding (each answer is in `results` by then), False at the timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if not self.sent:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _on_prediction(self, message) -> None:
        now = time.perf_counter()
        prediction = decode(Prediction, message.payload, content_type_of(message))
        with self.lock:  # popped and recorded together: settle() sees no answer half-recorded
            sent = self.sent.pop(prediction.frame_id, None)
            written = self.written.pop(prediction.frame_id, sent)
            if sent is not None and written is not None:
                self.results.append(Result(now, now - sent, prediction.timings.inference_ms, prediction,
                                           now - max(sent, written)))
        if self.refill:  # closed loop: every answer lets the next frame in
            self.send()

    def _on_status(self, message) -> None:
        status = decode(ServiceStatus, message.payload, content_type_of(message))
        if status.state is ServiceState.ONLINE:
            self.status = status
            self.online.set()

    def window(self, start: float, end: float) -> list[Result]:
        return [r for r in self.results if start <= r.received_at < end]


# -- the device --------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(broker: Broker, model_dir: Path, *, cores: Iterable[int] | None = None,
            **keys: Any) -> Iterator[tuple[Harness, Child]]:
    """`edgefleet inference` on the broker, online, with a harness connected to it.

    Args:
        broker: the broker the service and the harness meet on.
        model_dir: the model served.
        cores: the cores the service is started on (every thread of it inherits them, and it plans its
            workers for them); None: wherever this thread may run.
        keys: more inference settings by their flat names (max_batch=4, cache_enabled=True), over the
            bench's defaults.

    Yields:
        The harness, and the service's process.

    Raises:
        RuntimeError: the service did not come online within 60 s (its log's tail is in the message).
    """
    settings = load(InferenceSettings, None, **{
        "mqtt_url": broker.url, "device_id": DEVICE, "model_dir": model_dir, "queue_size": 256,
        "log_level": "WARNING", **keys})
    with tempfile.TemporaryDirectory() as tmp:
        with on_cores(cores):
            service = Child("inference", Path(tmp) / "inference.log", settings)
        harness = Harness(broker.url)
        try:
            harness.link.start()
            if not harness.online.wait(60):
                raise RuntimeError(f"inference did not come online: {service.log()[-2000:]}")
            yield harness, service
        finally:
            harness.link.stop()
            service.stop()


@contextlib.contextmanager
def device(model_dir: Path, cores: Cores, **keys: Any) -> Iterator[tuple[Harness, Child, Broker]]:
    """A whole device on the device's core: a Mosquitto broker and the inference service on it, with
    the harness (on this thread's cores) connected.

    Args:
        model_dir: the model served.
        cores: from split_cores(); unpinned, everything runs where this process may.
        keys: inference settings by their flat names, as for serving().

    Yields:
        The harness, the service's process and the broker.

    Raises:
        RuntimeError: the service did not come online, or pinning did not hold (a thread of the
            broker or the service may run outside the device's core).
    """
    with on_cores(cores.device):
        broker = Broker().start()
    try:
        with serving(broker, model_dir, cores=cores.device, **keys) as (harness, service):
            if cores.device is not None:
                for name, pid in (("mosquitto", broker.process.pid), ("inference", service.proc.pid)):
                    if (seen := cores_of(pid)) != cores.device:
                        raise RuntimeError(f"{name} runs on cores {_cpus(seen)}, not {_cpus(cores.device)}")
            yield harness, service, broker
    finally:
        broker.close()
