"""Publish: everything the inference service sends, on the topics shared.topics names and in the
messages shared.schemas defines: predictions, error reports, its retained status, answers to switches,
and its plugins' own messages (only ever under the plugin's topic).

A publish never waits on the network: paho takes it or refuses it at once (its queue full, or QoS 0
while the broker is away), and a refused prediction is counted lost, never retried, as Mosquitto
drops a QoS 0 message for a disconnected client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from services.inference.counters import Counters
from services.inference.link import Link
from services.inference.swap import ServedModel
from shared import VERSION, topics
from shared.codec import WireFormat, encode
from shared.logs import fields
from shared.schemas import (
    MAX_STR,
    ErrorReason,
    ErrorReport,
    InferenceStats,
    ModelRef,
    ModelSwitched,
    PluginStatus,
    PluginSwitched,
    Prediction,
    ServiceState,
    ServiceStatus,
)

SERVICE = "inference"
log = logging.getLogger(__name__)


class Publisher:
    """Sends the service's messages through its link and counts what became of each prediction.

    Args:
        link: the broker link.
        device: the device id the topics and messages name.
        wire: the format of predictions and error reports (the status is always JSON).
        qos: the QoS of predictions and error reports.
        counters: where published, lost and rejected frames are counted.
        observe: given each prediction published (metrics.Latency.observe: its timings); None: nothing.

    Attributes:
        status_at: when the last status was published (Unix time), None before the first.
    """

    def __init__(self, link: Link, *, device: str, wire: WireFormat, qos: int, counters: Counters,
                 observe: Callable[[Prediction], None] | None = None) -> None:
        self._link, self._device, self._wire, self._qos, self._counters = link, device, wire, qos, counters
        self._observe = observe
        self.status_at: float | None = None

    def prediction(self, prediction: Prediction) -> None:
        """Publishes a frame's prediction on its camera's topic; counts it published or lost."""
        info = self._link.publish(topics.predictions(self._device, prediction.camera), encode(prediction, self._wire),
                                  qos=self._qos, content_type=self._wire.content_type)
        if _accepted(info.rc, self._qos):
            self._count_published(prediction)
            if self._observe is not None:
                try:
                    self._observe(prediction)
                except Exception:  # published: a metrics fault must not make the caller answer it twice
                    log.exception("prediction latency not observed", extra=fields(frame_id=prediction.frame_id))
            return
        self._counters.lost.add()
        if (lost := self._counters.lost.value) == 1 or lost % 100 == 0:  # an outage must not flood the log too
            log.warning("prediction lost",
                        extra=fields(frame_id=prediction.frame_id, rc=paho.error_string(info.rc), lost=lost))

    def _count_published(self, prediction: Prediction) -> None:
        counters = self._counters
        counters.published.add()
        counters.published_by_camera.add(prediction.camera)
        if prediction.cached:  # a cached answer ran no model, whichever stage answered its reference
            counters.cached.add()
            exact = prediction.cache is not None and prediction.cache.match == "exact"
            (counters.cached_exact if exact else counters.cached_scene).add()
        elif prediction.cascade is not None:
            (counters.escalated if prediction.cascade.stage == 2 else counters.stage1).add()

    def reject(self, *, camera: str | None, reason: ErrorReason, detail: str, frame_id: str | None) -> None:
        """Answers a frame that gets no prediction with an error report, and counts it rejected."""
        self._counters.reject(reason, camera)
        log.info("frame rejected", extra=fields(camera=camera, frame_id=frame_id, reason=reason.value, detail=detail))
        self.report(reason, detail, camera=camera, frame_id=frame_id)

    def report(self, reason: ErrorReason, detail: str, *, camera: str | None = None,
               frame_id: str | None = None, plugin: ModelRef | None = None) -> None:
        """Publishes an error report on the device's error topic (detail cut to MAX_STR).

        Args:
            reason: the wire reason.
            detail: what happened, for a person.
            camera, frame_id: the frame it concerns, if one.
            plugin: the plugin a PLUGIN_FAULT or PLUGIN_DISABLED report names.
        """
        report = ErrorReport(device=self._device, service=SERVICE, reason=reason, detail=detail[:MAX_STR],
                             camera=camera, frame_id=frame_id, at=time.time(), plugin=plugin)
        self._link.publish(topics.errors(self._device), encode(report, self._wire), qos=self._qos,
                           content_type=self._wire.content_type)

    def status(self, status: ServiceStatus) -> None:
        """Publishes the service's retained status (JSON, QoS 1)."""
        self.status_at = time.time()
        self._link.publish(topics.status(self._device, SERVICE), encode(status), qos=1, retain=True,
                           content_type=WireFormat.JSON.content_type)

    def switched(self, result: ModelSwitched) -> None:
        """Answers a model switch request (JSON, QoS 1) and counts the swap done or refused."""
        (self._counters.swaps_ok if result.ok else self._counters.swaps_failed).add()
        self._link.publish(topics.model_switched(self._device), encode(result), qos=1,
                           content_type=WireFormat.JSON.content_type)


    def plugin_switched(self, result: PluginSwitched) -> None:
        """Answers a plugin switch request (JSON, QoS 1)."""
        self._link.publish(topics.plugin_switched(self._device), encode(result), qos=1,
                           content_type=WireFormat.JSON.content_type)

    def plugin_message(self, plugin: str, suffix: str, payload: bytes) -> None:
        """Publishes a plugin's message at QoS 0 on edgefleet/<device>/plugins/<plugin>/<suffix>.

        Args:
            plugin: the plugin's name (its manifest's, validated).
            suffix: the topic below the plugin's own; must have passed shared.plugin.check_emit_suffix.
            payload: the plugin's bytes, as it emitted them (bounded by its limits.emit_bytes).
        """
        self._link.publish(topics.plugin_message(self._device, plugin, suffix), payload, qos=0)


def status_message(*, device: str, state: ServiceState, model: ServedModel, stats: InferenceStats | None,
                   reason: str | None = None, plugins: list[PluginStatus] | None = None) -> ServiceStatus:
    """The service's status as the wire carries it.

    Args:
        device: the device id.
        state: online or offline.
        model: the model served now (named with its execution provider report).
        stats: the counters; None in the last will, which is written before any frame.
        reason: why offline ("shutdown", "connection lost").
        plugins: each plugin's state and counters (None: the service runs no plugin host).
    """
    return ServiceStatus(device=device, service=SERVICE, state=state, at=time.time(), edgefleet_version=VERSION,
                         reason=reason, model=model.ref, provider=model.session.provider, inference=stats,
                         plugins=plugins)


def fallback_text(model: ServedModel) -> str:
    """The provider-fallback report's detail: what was asked for, what runs, what this machine has."""
    p = model.session.provider
    return f"requested {p.requested[0]} but running on {p.active} (available: {', '.join(p.available)})"


def _accepted(rc: int, qos: int) -> bool:
    """Whether paho took a publish: sent, or (QoS > 0 only) kept in its session queue to send after the
    reconnect. MQTT_ERR_QUEUE_SIZE (queue full) and QoS 0 while disconnected mean it is gone."""
    return rc == paho.MQTT_ERR_SUCCESS or (qos > 0 and rc == paho.MQTT_ERR_NO_CONN)
