"""The inference service: its parts wired together, its threads started and stopped.

The frame's way is in pipeline.py (receive → batch → decode → infer → publish). Workers share the
served model's ONNX Runtime session and each run their own batch: while one decodes, another infers,
so every core stays busy, and on small CPUs several single-threaded runs beat one run spread over all
cores. SIGTERM stops intake, answers every frame already accepted, publishes the offline status,
exits 0. A switch request from the sync service loads the next model beside the current one and swaps
it in between batches (swap.py): no frame is dropped or answered twice. Plugins (plugins.py) run on
each prediction before it is published; a plugin switch loads the next set off the network thread and
installs it between batches the same way.

The service is handed its collaborators, the broker link, the model loader and the plugin host, by name (as Roboflow's
InferencePipeline is handed on_prediction and its watchdog); build() wires the real ones from the
settings, and is the one place that reads them.
"""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as paho

from services.inference.batcher import FrameBacklog
from services.inference.cache import SceneCache
from services.inference.counters import Counters
from services.inference.errors import InferenceError
from services.inference.intake import Intake
from services.inference.link import Link
from services.inference.metrics import InferenceCollector, Latency
from services.inference.pipeline import Receiver, Worker
from services.inference.plugins import NO_PLUGINS, PluginHost, PluginSet, PluginSwitcher, load_active
from services.inference.publisher import SERVICE, Publisher, fallback_text, status_message
from services.inference.session import plan_workers
from services.inference.swap import LoadModel, ModelLoader, ServedModel, Swapper
from services.inference.wasm import WasmHost
from shared import topics
from shared.codec import DecodeError, decode, encode
from shared.config import InferenceSettings
from shared.lifecycle import Liveness, serve
from shared.logs import fields
from shared.manifest import ModelError
from shared.metrics import service_registry
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import ErrorReason, InferenceStats, ModelSwitch, PluginSwitch, ServiceState, ServiceStatus

log = logging.getLogger(__name__)

# What build() raises for a model, provider or configuration it cannot serve: the process exits 3
# with the message; anything else is a bug and surfaces as a traceback.
START_ERRORS: tuple[type[Exception], ...] = (ModelError, InferenceError)


class InferenceService:
    """Frames in, predictions out, on one device.

    Args:
        link: the broker link, not yet started (run() starts and stops it).
        model: the model to serve first, loaded by `load_model`.
        load_model: loads each model a switch request names.
        settings: how to serve (device id, batching, queue, frame limits, prediction format...).
        workers: worker threads, each running its own batches (session.plan_workers says how many).
        plugins: the plugin host, not yet started (run() starts it, loads the active set from
            settings.plugins.dir, takes plugin switches, and stops it once the workers are done);
            None: no plugins run and no plugin switch is taken.

    Attributes:
        link: the broker link (the health check reads link.connected).
        liveness: the workers' proof of life, for the health check (shared.lifecycle).
        metrics: the service's Prometheus families (metrics.py), served by shared.lifecycle.serve.
    """

    def __init__(self, *, link: Link, model: ServedModel, load_model: LoadModel, settings: InferenceSettings,
                 workers: int, plugins: PluginHost | None = None) -> None:
        self.link = link
        self.liveness = Liveness()
        self._model = model
        self._settings = settings
        self._stopping = threading.Event()
        self._counters = Counters()
        self._backlog = FrameBacklog(settings.queue_size)
        self._cache = SceneCache(settings.cache) if settings.cache.enabled else None
        self.metrics = service_registry(device=settings.device_id, service=SERVICE, connected=link.connected.is_set,
                                        status_at=lambda: self._publisher.status_at)
        self._publisher = Publisher(link, device=settings.device_id, wire=settings.prediction_format,
                                    qos=settings.prediction_qos, counters=self._counters,
                                    observe=Latency(self.metrics, settings.device_id).observe)
        self.metrics.register(InferenceCollector(
            device=settings.device_id, counters=self._counters, queue_depth=lambda: len(self._backlog),
            model=lambda: self._model, plugins=lambda: self._plugins.status()))
        self._receive = Receiver(intake=Intake(settings.max_frame_bytes, settings.max_frame_pixels),
                                 backlog=self._backlog, publisher=self._publisher, counters=self._counters)
        self._plugin_host = plugins
        self._plugins = NO_PLUGINS
        worker = Worker(backlog=self._backlog, serving=lambda: self._model, publisher=self._publisher,
                        counters=self._counters, device=settings.device_id, max_batch=settings.max_batch,
                        max_wait_s=settings.max_wait_ms / 1000, top_k=settings.top_k,
                        max_image_pixels=settings.max_frame_pixels, max_image_bytes=settings.max_frame_bytes,
                        cache=self._cache,
                        plugins=None if plugins is None else lambda: self._plugins)
        self._threads = [threading.Thread(target=self._work, args=(worker,), name=f"worker-{i}")
                         for i in range(workers)]
        self._swapper = Swapper(load=load_model, install=self._install, serving=lambda: self._model.ref,
                                reply=self._publisher.switched)
        self._plugin_switcher = None if plugins is None else PluginSwitcher(
            host=plugins, settings=settings.plugins, install=self._install_plugins, serving=lambda: self._plugins,
            reply=self._publisher.plugin_switched)

    @property
    def model(self) -> ServedModel:
        """The model served now."""
        return self._model

    @property
    def plugins(self) -> PluginSet:
        """The plugins run now."""
        return self._plugins

    def run(self) -> int:
        """Serves until stop() is called, then drains; returns the exit status (0)."""
        frames_filter = topics.all_frames(self._settings.device_id)
        try:
            self._start(frames_filter)
            while not self._stopping.wait(self._settings.status_interval_s):
                self._publisher.status(self.status(ServiceState.ONLINE))
            self._drain(frames_filter)
        finally:
            # However run() ends (a start that raised after the ticker began included), the ticker's
            # non-daemon thread stops, or it would keep the process alive. stop() is idempotent.
            if self._plugin_host is not None:
                self._plugin_host.stop()
        return 0

    def stop(self) -> None:
        """Asks run() to drain and return; safe from a signal handler and from any thread."""
        self._stopping.set()

    def stats(self) -> InferenceStats:
        """The counters now, as the status message carries them."""
        return self._counters.snapshot(len(self._backlog))

    def status(self, state: ServiceState, reason: str | None = None) -> ServiceStatus:
        """The service's status message now, counters included."""
        return status_message(device=self._settings.device_id, state=state, model=self._model, stats=self.stats(),
                              reason=reason, plugins=None if self._plugin_host is None else self._plugins.status())

    def _start(self, frames_filter: str) -> None:
        self.link.subscribe(frames_filter, self._receive, qos=1)
        self.link.subscribe(topics.model_switch(self._settings.device_id), self._on_switch, qos=1)
        if self._plugin_host is not None:
            self.link.subscribe(topics.plugin_switch(self._settings.device_id), self._on_plugin_switch, qos=1)
        self.link.start()
        if self._plugin_host is not None:  # before the workers: the first frame meets the active set
            self._plugin_host.start()
            self._plugins = load_active(self._plugin_host, self._settings.plugins, self._publisher)
        for thread in self._threads:
            thread.start()
        self._swapper.start()
        if self._plugin_switcher is not None:
            self._plugin_switcher.start()
        if self._model.session.provider.fallback:
            self._publisher.report(ErrorReason.PROVIDER_FALLBACK, fallback_text(self._model))
        manifest = self._model.manifest
        log.info("serving", extra=fields(model=manifest.name, version=manifest.version,
                                         provider=self._model.session.provider.active, workers=len(self._threads),
                                         plugins=[f"{r.name} v{r.version}" for r in self._plugins.refs()]))

    def _drain(self, frames_filter: str) -> None:
        if not self.link.unsubscribe(frames_filter):
            log.warning("no UNSUBACK from the broker: frames it sent meanwhile count as dropped")
        self._swapper.stop()  # a switch in progress completes; none starts after
        if self._plugin_switcher is not None:
            self._plugin_switcher.stop()
        log.info("draining", extra=fields(queued=len(self._backlog)))
        self._backlog.close()  # the workers answer what is left, then stop
        for thread in self._threads:
            thread.join()
        if self._plugin_host is not None:  # after the workers: the frames left ran their plugins under its deadlines
            self._plugin_host.stop()
        self.link.stop(final_status=encode(self.status(ServiceState.OFFLINE, reason="shutdown")))
        log.info("stopped", extra=fields(**self.stats().model_dump()))

    def _work(self, worker: Worker) -> None:
        with self.liveness.watch(threading.current_thread().name) as progress:
            worker.run(progress)

    def _on_switch(self, message: paho.MQTTMessage) -> None:
        try:
            switch = decode(ModelSwitch, bytes(message.payload), content_type_of(message))
        except DecodeError as exc:
            self._publisher.report(ErrorReason.MALFORMED_COMMAND, f"model switch request: {exc}")
            return
        self._swapper.request(switch)

    def _on_plugin_switch(self, message: paho.MQTTMessage) -> None:
        try:
            switch = decode(PluginSwitch, bytes(message.payload), content_type_of(message))
        except DecodeError as exc:
            self._publisher.report(ErrorReason.MALFORMED_COMMAND, f"plugin switch request: {exc}")
            return
        if self._plugin_switcher is not None:
            self._plugin_switcher.request(switch)

    def _install_plugins(self, plugins: PluginSet) -> PluginSet:
        """Runs `plugins` from the next batch on; returns the set it replaces."""
        old, self._plugins = self._plugins, plugins  # one reference assignment, as for the model
        self._publisher.status(self.status(ServiceState.ONLINE))
        return old

    def _install(self, model: ServedModel) -> ServedModel:
        """Serves `model` from the next batch on; returns the model it replaces."""
        old, self._model = self._model, model  # one reference assignment: workers pick it up at their next batch
        if self._cache is not None:  # no answer of the old model is given again (entries also name their model)
            self._cache.clear()
        if model.session.provider.fallback:
            self._publisher.report(ErrorReason.PROVIDER_FALLBACK, fallback_text(model))
        self._publisher.status(self.status(ServiceState.ONLINE))
        return old


def build(settings: InferenceSettings) -> InferenceService:
    """The service with its real collaborators: the model the settings name, on an MqttLink, with a
    WasmHost for its plugins.

    The one place that reads the settings.

    Raises:
        ModelError: the model is missing, unreadable or not what its manifest says.
        InferenceError: an unknown execution provider, or (strict policy) a fallback.
    """
    workers, threads_per_run = plan_workers(settings.providers, settings.inference_workers, settings.intra_op_threads)
    load_model = ModelLoader(providers=settings.providers, strict=settings.provider_policy == "strict",
                             threads_per_run=threads_per_run, scaled_decode=settings.scaled_decode)
    model = load_model(settings.model_dir)
    will = status_message(device=settings.device_id, state=ServiceState.OFFLINE, model=model, stats=None,
                          reason="connection lost")
    service: InferenceService
    # The link announces the service's status on every connect; it connects only once run() starts it,
    # by which time `service` is bound.
    link = MqttLink(settings, SERVICE, StatusPublisher(topics.status(settings.device_id, SERVICE),
                                                       online=lambda: encode(service.status(ServiceState.ONLINE)),
                                                       will=encode(will)))
    service = InferenceService(link=link, model=model, load_model=load_model, settings=settings, workers=workers,
                               plugins=WasmHost(settings.plugins))
    return service


def main(settings: InferenceSettings) -> int:
    """Runs the service until SIGTERM; returns the process's exit status (3: it cannot start)."""
    return serve(SERVICE, settings, lambda: build(settings), START_ERRORS)
