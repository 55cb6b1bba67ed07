"""The inference service's Prometheus families (names in shared/metrics.py), read at scrape time from
the counters the status message already keeps (counters.py), so nothing is counted twice; only the
latency histograms keep their own buckets, observed as each prediction is published.

Every label has a bounded set of values: cameras as the counters name them (at most their cap, the
rest under shared.metrics.OTHER_CAMERA), rejections by ErrorReason, plugins by the names of the set
running now (at most 64), cache matches and cascade stages by their fixed values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from services.inference.batcher import CameraCounts
from services.inference.counters import Counters
from services.inference.swap import ServedModel
from shared import metrics as names
from shared.metrics import DEVICE_LABEL, LATENCY_BUCKETS_S, OTHER_CAMERA, labelled
from shared.schemas import PluginStatus, Prediction


def by_camera(counts: dict[str, int]) -> dict[str, int]:
    """Counts by camera label: CameraCounts' overflow key becomes OTHER_CAMERA (a camera really named
    so is summed with it: one label value each, never two series for one name)."""
    labels: dict[str, int] = {}
    for camera, n in counts.items():
        label = OTHER_CAMERA if camera == CameraCounts.OTHER else camera
        labels[label] = labels.get(label, 0) + n
    return labels


class InferenceCollector(Collector):
    """Yields the inference families from the service's live state at each scrape.

    Args:
        device: the device id (every family's `device` label).
        counters: the service's counters.
        queue_depth: frames queued now.
        model: the model served now.
        plugins: each plugin of the set running now, with its counters (empty: none).
    """

    def __init__(self, *, device: str, counters: Counters, queue_depth: Callable[[], int],
                 model: Callable[[], ServedModel], plugins: Callable[[], list[PluginStatus]]) -> None:
        self._device, self._counters, self._queue_depth = device, counters, queue_depth
        self._model, self._plugins = model, plugins

    def collect(self) -> Iterable[Metric]:
        for metric in (*self._frames(), *self._predictions(), *self._model_families(), *self._plugin_families()):
            yield labelled(metric, self._device)

    def _frames(self) -> Iterable[Metric]:
        c = self._counters
        yield _per_camera(names.FRAMES_RECEIVED, "Frames received, by camera.", c.received_by_camera)
        yield _per_camera(names.FRAMES_DROPPED, "Frames dropped unanswered (overload: the oldest of the fullest "
                          "camera; or arrived while draining), by camera.", c.dropped_by_camera)
        rejected = CounterMetricFamily(names.FRAMES_REJECTED, "Frames answered with an error report, by camera and "
                                       "reason.", labels=["camera", "reason"])
        for reason, counts in c.rejected_by_reason.items():
            for camera, n in sorted(by_camera(counts.snapshot()).items()):
                rejected.add_metric([camera, reason.value], n)
        yield rejected
        yield GaugeMetricFamily(names.QUEUE_DEPTH, "Frames queued, not yet taken by a worker.",
                                value=self._queue_depth())

    def _predictions(self) -> Iterable[Metric]:
        c = self._counters
        yield _per_camera(names.PREDICTIONS, "Predictions published, by camera.", c.published_by_camera)
        yield CounterMetricFamily(names.PREDICTIONS_LOST, "Predictions the MQTT client refused (never sent).",
                                  value=c.lost.value)
        cached = CounterMetricFamily(names.PREDICTIONS_CACHED, "Predictions answered by the scene cache (no model "
                                     "run), by match.", labels=["match"])
        cached.add_metric(["exact"], c.cached_exact.value)
        cached.add_metric(["scene"], c.cached_scene.value)
        yield cached
        cascade = CounterMetricFamily(names.CASCADE_ANSWERS, "Predictions of a cascade, by the stage that answered.",
                                      labels=["stage"])
        cascade.add_metric(["1"], c.stage1.value)
        cascade.add_metric(["2"], c.escalated.value)
        yield cascade
        yield CounterMetricFamily(names.PREDICTIONS_DROPPED_BY_PLUGINS, "Predictions a plugin dropped (not published).",
                                  value=c.dropped_by_plugins.value)
        yield CounterMetricFamily(names.BATCHES, "Model runs, each over one batch.", value=c.batches.value)

    def _model_families(self) -> Iterable[Metric]:
        model, c = self._model(), self._counters
        provider = model.session.provider
        yield InfoMetricFamily(names.MODEL_INFO, "The model served and its execution provider.",
                               value={"name": model.ref.name, "version": str(model.ref.version),
                                      "provider": provider.active})
        yield GaugeMetricFamily(names.PROVIDER_FALLBACK, "1 while serving on another execution provider than the "
                                "first asked for.", value=1.0 if provider.fallback else 0.0)
        swaps = CounterMetricFamily(names.MODEL_SWAPS, "Model switch requests, by outcome.", labels=["outcome"])
        swaps.add_metric(["ok"], c.swaps_ok.value)
        swaps.add_metric(["failed"], c.swaps_failed.value)
        yield swaps

    def _plugin_families(self) -> Iterable[Metric]:
        # Counted since each plugin was switched in: a new version restarts its count, which rate()
        # reads as a counter reset.
        calls = CounterMetricFamily(names.PLUGIN_CALLS, "Plugin calls, by plugin.", labels=["plugin"])
        faults = CounterMetricFamily(names.PLUGIN_FAULTS, "Plugin calls that faulted, by plugin.", labels=["plugin"])
        for status in self._plugins():
            calls.add_metric([status.plugin.name], status.calls)
            faults.add_metric([status.plugin.name], status.faults)
        yield calls
        yield faults


def _per_camera(name: str, documentation: str, counts: CameraCounts) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["camera"])
    for camera, n in sorted(by_camera(counts.snapshot()).items()):
        family.add_metric([camera], n)
    return family


class Latency:
    """The latency histograms (seconds, shared.metrics.LATENCY_BUCKETS_S), from each published
    prediction's timings: queue and total for every prediction; decode and model only for those the
    model answered (a cached answer decoded nothing and ran no model: its zeros would drag both down).

    Args:
        registry: where the histograms are registered.
        device: the device id (the `device` label).
    """

    def __init__(self, registry: CollectorRegistry, device: str) -> None:
        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(name, documentation, [DEVICE_LABEL], registry=registry,
                             buckets=LATENCY_BUCKETS_S).labels(device)

        self._queue = histogram(names.QUEUE_SECONDS, "From a frame's arrival until a worker took its batch.")
        self._decode = histogram(names.DECODE_SECONDS, "A frame's decode and preprocessing.")
        self._model = histogram(names.MODEL_SECONDS, "The model's run over the frame's batch.")
        self._total = histogram(names.TOTAL_SECONDS, "From a frame's arrival until its prediction was made.")

    def observe(self, prediction: Prediction) -> None:
        """Adds one published prediction's timings."""
        t = prediction.timings
        self._queue.observe(t.queued_ms / 1000)
        self._total.observe(t.total_ms / 1000)
        if not prediction.cached:
            self._decode.observe(t.preprocess_ms / 1000)
            self._model.observe(t.inference_ms / 1000)
