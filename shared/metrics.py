"""Counters that several threads bump (the paho network thread, a worker, the status timer), and
Prometheus metrics: every family's name, defined once here, and the HTTP endpoint each service serves
them on (EDGEFLEET_METRICS_PORT). deploy/prometheus/ (scrape config, alert rules) and the Grafana
dashboard use these names; tests/unit/test_metric_names.py checks that every name they query is one.

Conventions (https://prometheus.io/docs/practices/naming/): base units in the name (`_seconds`,
`_bytes`, `_ratio`), counters end in `_total`, every family carries the `device` label (one value
per process), and every other label has a bounded set of values: cameras beyond the service's
camera cap count under the camera "other"; no frame ids, no request ids, no free text.
Latency histograms are in seconds with buckets that resolve milliseconds (LATENCY_BUCKETS_S).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import VERSION

log = logging.getLogger(__name__)


class Counter:
    """An int that only grows, safe to add to from any thread; reading it takes no lock."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        return self._value


PREFIX = "edgefleet"

# 0.5 ms to 10 s: a frame's stages take 0.1–30 ms on a CPU (measured: decode ~2 ms, model ~10 ms on
# EfficientNet-Lite0 at batch 1), an overloaded queue or a slow S3 PUT up to seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

DEVICE_LABEL = "device"
OTHER_CAMERA = "other"

# -- every service --------------------------------------------------------------------------------------
# Info families: prometheus_client exposes Info("edgefleet_model") as edgefleet_model_info{...} 1.
SERVICE_INFO = f"{PREFIX}_service"  # Info: device, service, version
BROKER_CONNECTED = f"{PREFIX}_broker_connected"  # gauge 0/1
STATUS_TIMESTAMP = f"{PREFIX}_status_timestamp_seconds"  # gauge: when the service last published its status

# -- inference ------------------------------------------------------------------------------------------
FRAMES_RECEIVED = f"{PREFIX}_frames_received_total"  # camera
FRAMES_DROPPED = f"{PREFIX}_frames_dropped_total"  # camera (overload: oldest dropped)
FRAMES_REJECTED = f"{PREFIX}_frames_rejected_total"  # camera, reason (ErrorReason values: bounded)
PREDICTIONS = f"{PREFIX}_predictions_total"  # camera
PREDICTIONS_LOST = f"{PREFIX}_predictions_lost_total"
PREDICTIONS_CACHED = f"{PREFIX}_predictions_cached_total"  # match: exact|scene
CASCADE_ANSWERS = f"{PREFIX}_cascade_answers_total"  # stage: 1|2
PREDICTIONS_DROPPED_BY_PLUGINS = f"{PREFIX}_predictions_dropped_by_plugins_total"
BATCHES = f"{PREFIX}_inference_batches_total"
QUEUE_DEPTH = f"{PREFIX}_inference_queue_depth"  # gauge: frames waiting
QUEUE_SECONDS = f"{PREFIX}_inference_queue_seconds"  # histogram: received → batch taken
DECODE_SECONDS = f"{PREFIX}_inference_decode_seconds"  # histogram: decode + preprocess
MODEL_SECONDS = f"{PREFIX}_inference_model_seconds"  # histogram: the model run (per frame's batch)
TOTAL_SECONDS = f"{PREFIX}_inference_total_seconds"  # histogram: received → published
MODEL_INFO = f"{PREFIX}_model"  # Info: name, version, provider
PROVIDER_FALLBACK = f"{PREFIX}_provider_fallback"  # gauge 0/1: serving on another provider than asked
MODEL_SWAPS = f"{PREFIX}_model_swaps_total"  # outcome: ok|failed
PLUGIN_CALLS = f"{PREFIX}_plugin_calls_total"  # plugin
PLUGIN_FAULTS = f"{PREFIX}_plugin_faults_total"  # plugin

# -- sync -----------------------------------------------------------------------------------------------
SYNC_STATE = f"{PREFIX}_sync_state"  # gauge 1 for the current state, 0 for the others: state
SYNC_TRANSITIONS = f"{PREFIX}_sync_transitions_total"  # state
SYNC_ROLLBACKS = f"{PREFIX}_sync_rollbacks_total"
SYNC_DOWNLOADED_BYTES = f"{PREFIX}_sync_downloaded_bytes_total"

# -- telemetry ------------------------------------------------------------------------------------------
OUTBOX_RECORDS = f"{PREFIX}_outbox_records"  # gauge
OUTBOX_BYTES = f"{PREFIX}_outbox_bytes"  # gauge
OUTBOX_OLDEST_AGE = f"{PREFIX}_outbox_oldest_record_age_seconds"  # gauge, 0 when empty
RECORDS_DROPPED = f"{PREFIX}_telemetry_records_dropped_total"  # reason (GapReason values)
BATCHES_SENT = f"{PREFIX}_forwarder_batches_sent_total"
BATCHES_RESENT = f"{PREFIX}_forwarder_batches_resent_total"
RECORDS_ACKNOWLEDGED = f"{PREFIX}_forwarder_records_acknowledged_total"
DRIFT_SCORE = f"{PREFIX}_drift_score"  # gauge: measure (prediction_psi, confidence_mean, feature_z ...)
ALERTS_OPEN = f"{PREFIX}_alerts_open"  # gauge: type
ALERTS_RAISED = f"{PREFIX}_alerts_raised_total"  # type
CPU_RATIO = f"{PREFIX}_device_cpu_ratio"  # gauge 0..1 of the whole machine
MEMORY_USED_BYTES = f"{PREFIX}_device_memory_used_bytes"
MEMORY_RATIO = f"{PREFIX}_device_memory_ratio"
DISK_RATIO = f"{PREFIX}_device_disk_used_ratio"
TEMPERATURE = f"{PREFIX}_device_temperature_celsius"  # sensor
CONTAINER_CPU_RATIO = f"{PREFIX}_container_cpu_ratio"  # container (of one core, as docker stats)
CONTAINER_MEMORY_BYTES = f"{PREFIX}_container_memory_bytes"  # container

# -- cloud_ingest ---------------------------------------------------------------------------------------
INGEST_BATCHES = f"{PREFIX}_ingest_batches_total"  # outcome: stored|duplicate|dead_lettered|failed|refused
INGEST_RECORDS = f"{PREFIX}_ingest_records_total"
INGEST_WRITE_SECONDS = f"{PREFIX}_ingest_write_seconds"  # histogram: one flush's S3 writes

ALL = tuple(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and v.startswith(PREFIX + "_"))
# The families a scrape shows under other names: a histogram as <name>_bucket, _sum and _count, an
# Info as <name>_info. Queries (deploy/prometheus/, deploy/grafana/) use those names.
HISTOGRAMS = (QUEUE_SECONDS, DECODE_SECONDS, MODEL_SECONDS, TOTAL_SECONDS, INGEST_WRITE_SECONDS)
INFOS = (SERVICE_INFO, MODEL_INFO)


# -- the endpoint and the families every service has -----------------------------------------------------


class MetricsEndpoint:
    """Serves one registry at http://host:port/metrics from its own thread (prometheus_client's WSGI
    server). Its owner calls start() once and stop() once (shared.lifecycle.serve does both).

    :param CollectorRegistry registry: what a scrape reads (the service's `metrics`).
    :param str host: the address to listen on.
    :param int port: the port; 0 takes a free one, which `port` then names.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry, self.host, self.port = registry, host, port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listens and serves in the background.

        :raises OSError: the address cannot be bound (the port in use, the host not this machine's).
        """
        self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        self._thread.name = "metrics-http"
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stops serving and closes the socket; a no-op before start() and after a first stop()."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        server.shutdown()  # returns once serve_forever has returned
        server.server_close()
        thread.join()


def labelled(metric: Metric, device: str) -> Metric:
    """`metric` with the device label added to every sample (a collector builds its families without it)."""
    for i, sample in enumerate(metric.samples):
        metric.samples[i] = sample._replace(labels={DEVICE_LABEL: device, **sample.labels})
    return metric


class ServiceCollector(Collector):
    """The families every service has: SERVICE_INFO, BROKER_CONNECTED, STATUS_TIMESTAMP, read at scrape time.

    :param str device: the device id (the `device` label).
    :param str service: the service's name (SERVICE_INFO's `service` label).
    :param connected: whether the broker link is up now.
    :param status_at: when the service last published its status (epoch seconds), None before the first.
    """

    def __init__(self, *, device: str, service: str, connected: Callable[[], bool],
                 status_at: Callable[[], float | None]) -> None:
        self.device, self.service, self.connected, self.status_at = device, service, connected, status_at

    def collect(self) -> Iterable[Metric]:
        yield labelled(InfoMetricFamily(SERVICE_INFO, "The service and the edgefleet release it runs.",
                                        value={"service": self.service, "version": VERSION}), self.device)
        yield labelled(GaugeMetricFamily(BROKER_CONNECTED, "1 while the broker link is connected, else 0.",
                                         value=1.0 if self.connected() else 0.0), self.device)
        at = self.status_at()
        if at is not None:  # no sample before the first status: 0 would read as "stale since 1970"
            yield labelled(GaugeMetricFamily(STATUS_TIMESTAMP, "When the service last published its status "
                                             "(Unix time).", value=at), self.device)


def service_registry(*, device: str, service: str, connected: Callable[[], bool],
                     status_at: Callable[[], float | None]) -> CollectorRegistry:
    """A new registry holding the families every service has (ServiceCollector's parameters); the
    service registers its own families in it and exposes it as its `metrics` attribute."""
    # No `_created` series: the text format carries them as extra gauge families that double the
    # series a scrape stores and that no query here reads. Process-wide, and every edgefleet family
    # goes through here.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    registry = CollectorRegistry()
    registry.register(ServiceCollector(device=device, service=service, connected=connected, status_at=status_at))
    return registry
