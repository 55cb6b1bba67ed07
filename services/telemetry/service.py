"""The telemetry service: the one owner of the device's outbox, its two MQTT links (the device's
broker in, the cloud broker out) and the forwarder thread.

What it learns, from the inference records on the device's broker:
    predictions → drift detector → alerts (raised / resolved)    ┐
    predictions + enveloped frames → hard-example sampler        ├→ outbox (batched commits) → forwarder → cloud
    psutil / Docker API (own thread) → resource samples          ┤
    drift detector, every sample_interval_s → drift samples      ┘
Alerts also go out at once on the device's own alerts topic. SIGTERM commits what is pending, stops
the forwarder between batches, and exits 0: the outbox keeps the rest for the next start. A failed
commit (disk full) or a dead forwarder thread ends the process non-zero within seconds
(shared.lifecycle), after counting the records it could not write. Its Prometheus families
(metrics.py) are read from all of these at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as paho

from services.telemetry.drift import DriftDetector
from services.telemetry.forwarder import Forwarder
from services.telemetry.hard_examples import HardExampleSampler
from services.telemetry.metrics import AlertCounts, TelemetryCollector
from services.telemetry.outbox import Outbox
from services.telemetry.resources import ResourceMonitor
from shared import VERSION, metrics, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import TelemetrySettings
from shared.errors import EdgefleetError
from shared.lifecycle import Liveness, serve
from shared.logs import fields
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import (
    Alert,
    AlertState,
    AlertType,
    ErrorReason,
    ErrorReport,
    FrameEnvelope,
    Prediction,
    RecordBody,
    ResourceSample,
    ServiceState,
    ServiceStatus,
    Severity,
    TelemetryStats,
)

SERVICE = "telemetry"
log = logging.getLogger(__name__)


class TelemetryService:
    def __init__(self, settings: TelemetrySettings) -> None:
        s = self.settings = settings
        self._device = settings.device_id
        self.outbox = Outbox(
            s.outbox.path, self._device, s.outbox.max_bytes, drop=s.outbox.full_policy,
            ttl_s=s.ttl.by_kind(),
        )
        self.drift = DriftDetector(self._device, s.drift)
        self.hard_examples = HardExampleSampler(self._device, s.hard_example_confidence, s.hard_examples_per_minute)
        self.monitor = ResourceMonitor(self._device, s.outbox.path.parent, s.docker.url, s.docker.project,
                                       s.resource_interval_s)
        self._pending: list[RecordBody] = []
        self._pending_lock = threading.Lock()
        self._fallback_alert: Alert | None = None
        self._resources: ResourceSample | None = None  # the last one queued, for the metrics
        self.alert_counts = AlertCounts()
        self._status_at: float | None = None
        self._stopping = threading.Event()
        self.uplink = MqttLink(settings.cloud(), "telemetry-uplink")
        self.liveness = Liveness()  # the commit loop's and the forwarder's proof of life (shared.lifecycle)
        self.forwarder = Forwarder(self.outbox, self.uplink, self._device, batch=s.batch, forward=s.forward,
                                   ack_timeout_s=s.ack_timeout_s, liveness=self.liveness)
        self.link = MqttLink(
            settings, SERVICE,
            StatusPublisher(topics.status(self._device, SERVICE),
                            online=lambda: encode(self._status(ServiceState.ONLINE)),
                            will=encode(self._status(ServiceState.OFFLINE, reason="connection lost"))),
        )
        self.metrics = metrics.service_registry(device=self._device, service=SERVICE,
                                                connected=lambda: self.link.connected.is_set(),
                                                status_at=lambda: self._status_at)
        self.metrics.register(TelemetryCollector(
            device=self._device, outbox=self.outbox, forwarder=self.forwarder, drift=self.drift,
            alerts=self.alert_counts, open_alerts=self._open_alerts, resources=lambda: self._resources))

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        self.link.subscribe(topics.all_predictions(self._device), self._on_prediction, qos=0)
        self.link.subscribe(topics.all_frames(self._device), self._on_frame, qos=0)
        self.link.subscribe(topics.status(self._device, "inference"), self._on_inference_status, qos=1)
        self.link.start()
        self.uplink.start()
        self.forwarder.start()
        self.monitor.start()  # Docker stats on their own thread: sample() below never waits for the engine
        if self.outbox.stats.repaired:
            self._error(f"outbox repaired: {self.outbox.stats.repaired}")
        log.info("watching", extra=fields(outbox=str(s.outbox.path), queued=self.outbox.stats.records,
                                          next_seq=self.outbox.stats.next_seq))
        due = {"resources": 0.0, "expire": time.monotonic() + 60, "status": 0.0,
               "drift": time.monotonic() + s.drift.sample_interval_s}
        with self.liveness.watch("commits", s.flush_interval_s) as commits:
            while not self._stopping.wait(s.flush_interval_s):
                now = time.monotonic()
                if now >= due["resources"]:
                    due["resources"] = now + s.resource_interval_s
                    self._resources = self.monitor.sample(self.outbox.stats.bytes, self.outbox.stats.records)
                    self._queue(self._resources)
                if now >= due["drift"]:
                    due["drift"] = now + s.drift.sample_interval_s
                    self._sample_drift()
                if now >= due["expire"]:
                    due["expire"] = now + 60
                    self.outbox.expire()
                self._flush()
                if now >= due["status"]:
                    due["status"] = now + s.status_interval_s
                    self.link.publish(topics.status(self._device, SERVICE), encode(self._status(ServiceState.ONLINE)),
                                      qos=1, retain=True, content_type=WireFormat.JSON.content_type)
                    self._status_at = time.time()
                commits.tick(s.flush_interval_s)  # the wait above is announced: idle is alive
        self._flush()
        self.monitor.stop()
        self.forwarder.stop()
        self.uplink.stop()
        self.link.stop(final_status=encode(self._status(ServiceState.OFFLINE, reason="shutdown")))
        self.outbox.close()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def _sample_drift(self) -> None:
        """Queues the drift detector's sample, once the cloud has shown it knows drift samples: an ingest
        older than DriftSample dead-letters the whole batch that carries one, the device's other records
        with it. An acknowledgement naming its store (TelemetryAck.store, which the outbox keeps) comes
        only from an ingest that knows them; until then no sample is taken, so none waits to be sent."""
        if self.outbox.store_seen and (drift := self.drift.sample()) is not None:
            self._queue(drift)

    def _queue(self, body: RecordBody) -> None:
        with self._pending_lock:
            self._pending.append(body)

    def _flush(self) -> None:
        """One transaction for everything gathered since the last flush: flash sees one write, not hundreds."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending:
            try:
                self.outbox.append(pending)
            except BaseException:  # disk full or I/O error: count what is lost, then let the process end loudly
                self.outbox.lost_in_write(len(pending))
                raise
            self.forwarder.wake()

    # -- records in (paho's network thread) ---------------------------------------------------------

    def _on_prediction(self, message: paho.MQTTMessage) -> None:
        try:
            prediction = decode(Prediction, message.payload, content_type_of(message))
        except DecodeError:
            return
        for alert in self.drift.observe(prediction):
            self._alert(alert)
        if (example := self.hard_examples.consider(prediction)) is not None:
            self._queue(example)

    def _on_frame(self, message: paho.MQTTMessage) -> None:
        try:  # raw frames carry no frame id to match a prediction with: only envelopes are kept
            self.hard_examples.remember(decode(FrameEnvelope, message.payload, content_type_of(message)))
        except DecodeError:
            pass

    def _on_inference_status(self, message: paho.MQTTMessage) -> None:
        try:
            status = decode(ServiceStatus, message.payload, content_type_of(message))
        except DecodeError:
            return
        p = status.provider
        if p is None:  # not reported (inference not started yet): no news either way
            return
        if p.fallback and self._fallback_alert is None:
            self._fallback_alert = Alert(
                device=self._device, alert_id=f"provider-{int(time.time())}", type=AlertType.PROVIDER_FALLBACK,
                state=AlertState.RAISED, severity=Severity.CRITICAL, value=1.0, threshold=0.0, window=1,
                model=status.model, detail=f"asked for {p.requested[0]}, running on {p.active}", at=time.time(),
            )
            self._alert(self._fallback_alert)
        elif not p.fallback and self._fallback_alert is not None:
            ended = self._fallback_alert.model_copy(update={
                "state": AlertState.RESOLVED, "value": 0.0, "at": time.time(), "detail": f"running on {p.active} again",
            })
            self._fallback_alert = None
            self._alert(ended)

    def _open_alerts(self) -> list[AlertType]:
        fallback = [AlertType.PROVIDER_FALLBACK] if self._fallback_alert is not None else []
        return self.drift.open_types() + fallback

    def _alert(self, alert: Alert) -> None:
        self.alert_counts.count(alert)
        log.warning("alert", extra=fields(type=alert.type.value, state=alert.state.value, value=alert.value,
                                          threshold=alert.threshold, id=alert.alert_id))
        self.link.publish(topics.alerts(self._device), encode(alert), qos=1, content_type=WireFormat.JSON.content_type)
        self._queue(alert)

    def _error(self, detail: str) -> None:
        report = ErrorReport(device=self._device, service=SERVICE, reason=ErrorReason.INTERNAL, detail=detail,
                             at=time.time())
        self.link.publish(topics.errors(self._device), encode(report), qos=1, content_type=WireFormat.JSON.content_type)

    def _status(self, state: ServiceState, reason: str | None = None) -> ServiceStatus:
        o, f = self.outbox.stats, self.forwarder
        stats = TelemetryStats(
            queue_records=o.records, queue_bytes=o.bytes, next_seq=o.next_seq, dropped=dict(o.dropped),
            batches_sent=f.sent_batches.value, batches_resent=f.resent_batches.value,
            records_acknowledged=f.acked_records.value, open_alerts=sorted(a.value for a in self.drift.open_types()),
            outbox_repaired=o.repaired, epoch=self.outbox.epoch, records_refused=o.refused,
            batches_dead_lettered=f.dead_lettered_batches.value, docker_errors=self.monitor.docker_errors,
        )
        return ServiceStatus(device=self._device, service=SERVICE, state=state, at=time.time(),
                             edgefleet_version=VERSION, reason=reason, telemetry=stats)


def main(settings: TelemetrySettings) -> int:
    # EdgefleetError: OutboxError (the outbox cannot be opened as configured).
    return serve(SERVICE, settings, lambda: TelemetryService(settings), (EdgefleetError, OSError, ValueError))
