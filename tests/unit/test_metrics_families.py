"""The Prometheus families as a scrape reads them (prometheus_client's own exposition and parser), from
the inference counters, the latency histograms and the sync state, with no process or socket: every
name is shared.metrics', counters end in _total, every sample has the device label, every label set
is bounded."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.inference.counters import Counters
from services.inference.metrics import InferenceCollector, Latency
from services.sync.metrics import SyncMetrics
from shared import metrics as names
from shared.metrics import DEVICE_LABEL, LATENCY_BUCKETS_S, OTHER_CAMERA, service_registry
from shared.schemas import (
    CacheSource,
    ErrorReason,
    ModelRef,
    PluginState,
    PluginStatus,
    Prediction,
    ProviderReport,
    SyncState,
    Timings,
)

DEVICE = "unit-1"
REF = ModelRef(name="efficientnet-lite0", version=3, sha256="ab" * 32)
INFERENCE_FAMILIES = (
    names.FRAMES_RECEIVED, names.FRAMES_DROPPED, names.FRAMES_REJECTED, names.PREDICTIONS, names.PREDICTIONS_LOST,
    names.PREDICTIONS_CACHED, names.CASCADE_ANSWERS, names.PREDICTIONS_DROPPED_BY_PLUGINS, names.BATCHES,
    names.QUEUE_DEPTH, names.QUEUE_SECONDS, names.DECODE_SECONDS, names.MODEL_SECONDS, names.TOTAL_SECONDS,
    names.MODEL_INFO, names.PROVIDER_FALLBACK, names.MODEL_SWAPS, names.PLUGIN_CALLS, names.PLUGIN_FAULTS,
)


def _model(fallback: bool = False) -> SimpleNamespace:
    """What the collector reads of a ServedModel: its ref and its session's provider report."""
    provider = ProviderReport(requested=["CUDAExecutionProvider" if fallback else "CPUExecutionProvider"],
                              available=["CPUExecutionProvider"], active="CPUExecutionProvider", fallback=fallback)
    return SimpleNamespace(ref=REF, session=SimpleNamespace(provider=provider))


def _inference_registry(counters: Counters, *, queued: int = 0, plugins: list[PluginStatus] | None = None,
                        fallback: bool = False) -> tuple[CollectorRegistry, Latency]:
    registry = service_registry(device=DEVICE, service="inference", connected=lambda: True, status_at=lambda: 1.5e9)
    latency = Latency(registry, DEVICE)
    model = _model(fallback)
    registry.register(InferenceCollector(device=DEVICE, counters=counters, queue_depth=lambda: queued,
                                         model=lambda: model, plugins=lambda: plugins or []))  # type: ignore[arg-type,return-value]
    return registry, latency


def _scrape(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """Samples by family name, as Prometheus' text format carries them (counters' family names lose _total)."""
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


INFO_FAMILIES = (names.SERVICE_INFO, names.MODEL_INFO)


def _exposed(name: str) -> str:
    """A family's name as the text format declares it: an info family gains _info, a counter loses _total."""
    return f"{name}_info" if name in INFO_FAMILIES else name.removesuffix("_total")


def _family(scraped: dict[str, list[Sample]], name: str) -> list[Sample]:
    return scraped[_exposed(name)]


def _value(samples: list[Sample], sample_name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample_name, labels, samples)
    return found[0]


def _prediction(camera: str, *, cached: CacheSource | None = None) -> Prediction:
    timings = Timings(queued_ms=3.0, preprocess_ms=2.0, inference_ms=0.0 if cached else 12.0, total_ms=18.0,
                      batch_size=0 if cached else 1)
    return Prediction(device=DEVICE, camera=camera, frame_id=f"{camera}-1", captured_at=None, top=[], model=REF,
                      provider="CPUExecutionProvider", timings=timings, published_at=0.0,
                      cached=cached is not None, cache=cached)


def test_every_inference_family_is_served_with_the_device_label_and_counters_end_in_total():
    counters = Counters()
    for _ in range(3):
        counters.receive("door")
    counters.reject(ErrorReason.UNDECODABLE, "door")
    counters.drop("door")
    counters.published_by_camera.add("door")
    plugin = PluginStatus(plugin=ModelRef(name="blur", version=1, sha256="cd" * 32), state=PluginState.ACTIVE,
                          calls=7, faults=2)
    registry, latency = _inference_registry(counters, queued=4, plugins=[plugin])
    latency.observe(_prediction("door"))
    scraped = _scrape(registry)

    every = (*INFERENCE_FAMILIES, names.SERVICE_INFO, names.BROKER_CONNECTED, names.STATUS_TIMESTAMP)
    families = {name: _family(scraped, name) for name in every}
    assert set(scraped) == {_exposed(n) for n in every}, "a family not named in shared.metrics"
    for name, samples in families.items():
        assert samples, f"{name} has no sample"
        assert all(s.labels.get(DEVICE_LABEL) == DEVICE for s in samples), name
    counters_served = [f for f in text_string_to_metric_families(generate_latest(registry).decode())
                       if f.type == "counter"]
    assert {f.name for f in counters_served} == {n.removesuffix("_total") for n in every if n.endswith("_total")}
    assert all(s.name == f"{f.name}_total" for f in counters_served for s in f.samples)
    assert _value(families[names.PLUGIN_CALLS], names.PLUGIN_CALLS, plugin="blur") == 7
    assert _value(families[names.PLUGIN_FAULTS], names.PLUGIN_FAULTS, plugin="blur") == 2
    assert _value(families[names.QUEUE_DEPTH], names.QUEUE_DEPTH) == 4
    assert _value(families[names.FRAMES_REJECTED], names.FRAMES_REJECTED, camera="door", reason="undecodable") == 1
    info = _value(families[names.MODEL_INFO], f"{names.MODEL_INFO}_info", name=REF.name, version="3",
                  provider="CPUExecutionProvider")
    assert info == 1


def test_a_hundred_cameras_give_at_most_cap_plus_one_label_values_and_keep_every_count():
    cap = 8
    counters = Counters.capped(cap)
    for i in range(100):
        for _ in range(i % 3 + 1):
            counters.receive(f"cam-{i}")
        counters.drop(f"cam-{i}")
        counters.reject(ErrorReason.UNDECODABLE, f"cam-{i}")
    registry, _ = _inference_registry(counters)
    scraped = _scrape(registry)

    received = _family(scraped, names.FRAMES_RECEIVED)
    dropped = _family(scraped, names.FRAMES_DROPPED)
    rejected = _family(scraped, names.FRAMES_REJECTED)
    for samples in (received, dropped, rejected):
        cameras = {s.labels["camera"] for s in samples if s.name.endswith("_total")}
        assert len(cameras) == cap + 1 and OTHER_CAMERA in cameras
    assert sum(s.value for s in received if s.name.endswith("_total")) == counters.received.value == 199
    assert sum(s.value for s in dropped if s.name.endswith("_total")) == 100
    assert sum(s.value for s in rejected if s.name.endswith("_total")) == 100


def test_matches_stages_and_outcomes_are_their_fixed_sets_even_at_zero():
    scraped = _scrape(_inference_registry(Counters())[0])

    def values(name: str, label: str) -> set[str]:
        return {s.labels[label] for s in _family(scraped, name) if s.name.endswith("_total")}

    # Rejections are by camera too: none is named before a camera's first frame (as frames received).
    assert values(names.FRAMES_REJECTED, "reason") == set()
    assert values(names.PREDICTIONS_CACHED, "match") == {"exact", "scene"}
    assert values(names.CASCADE_ANSWERS, "stage") == {"1", "2"}
    assert values(names.MODEL_SWAPS, "outcome") == {"ok", "failed"}


def test_latency_histograms_take_seconds_and_a_cached_answer_adds_no_decode_or_model_time():
    registry, latency = _inference_registry(Counters())
    latency.observe(_prediction("door"))
    latency.observe(_prediction("door", cached=CacheSource(frame_id="door-0", age_ms=5.0, match="scene")))
    scraped = _scrape(registry)

    def count(name: str) -> float:
        return _value(_family(scraped, name), f"{name}_count")

    assert (count(names.QUEUE_SECONDS), count(names.TOTAL_SECONDS)) == (2, 2)
    assert (count(names.DECODE_SECONDS), count(names.MODEL_SECONDS)) == (1, 1)
    assert _value(_family(scraped, names.MODEL_SECONDS), f"{names.MODEL_SECONDS}_sum") == 0.012
    buckets = [s for s in _family(scraped, names.MODEL_SECONDS) if s.name.endswith("_bucket")]
    assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
    # 12 ms falls in the 15 ms bucket, not the 10 ms one: buckets resolve milliseconds.
    assert _value(buckets, f"{names.MODEL_SECONDS}_bucket", le="0.01") == 0
    assert _value(buckets, f"{names.MODEL_SECONDS}_bucket", le="0.015") == 1


def test_provider_fallback_and_broker_link_read_as_zero_or_one():
    registry, _ = _inference_registry(Counters(), fallback=True)
    assert _value(_scrape(registry)[names.PROVIDER_FALLBACK], names.PROVIDER_FALLBACK) == 1
    connected = [False]
    registry = service_registry(device=DEVICE, service="sync", connected=lambda: connected[0], status_at=lambda: None)
    scraped = _scrape(registry)
    assert _value(scraped[names.BROKER_CONNECTED], names.BROKER_CONNECTED) == 0
    assert names.STATUS_TIMESTAMP not in scraped, "no status yet: no timestamp (0 would read as stale since 1970)"
    assert _value(_family(scraped, names.SERVICE_INFO), f"{names.SERVICE_INFO}_info", service="sync") == 1
    connected[0] = True
    assert _value(_scrape(registry)[names.BROKER_CONNECTED], names.BROKER_CONNECTED) == 1


def test_sync_state_is_one_for_the_current_state_and_transitions_count_states_entered():
    registry = service_registry(device=DEVICE, service="sync", connected=lambda: True, status_at=lambda: None)
    sync = SyncMetrics(registry, DEVICE)
    for state in ("idle", "received", "downloading", "downloading", "verified", "installed", "active",
                  "received", "downloading", "failed", "received", "rolled_back"):
        sync.reported(SyncState(state))
    sync.downloaded(1000)
    sync.downloaded(234)
    scraped = _scrape(registry)

    state = {s.labels["state"]: s.value for s in scraped[names.SYNC_STATE]}
    assert set(state) == {s.value for s in SyncState}
    assert state == {s.value: (1.0 if s is SyncState.ROLLED_BACK else 0.0) for s in SyncState}
    transitions = _family(scraped, names.SYNC_TRANSITIONS)
    assert _value(transitions, names.SYNC_TRANSITIONS, state="downloading") == 2, "a repeated report is no transition"
    assert _value(transitions, names.SYNC_TRANSITIONS, state="received") == 3
    assert _value(transitions, names.SYNC_TRANSITIONS, state="not_targeted") == 0
    assert _value(_family(scraped, names.SYNC_ROLLBACKS), names.SYNC_ROLLBACKS) == 1
    assert _value(_family(scraped, names.SYNC_DOWNLOADED_BYTES), names.SYNC_DOWNLOADED_BYTES) == 1234
    assert all(s.labels[DEVICE_LABEL] == DEVICE for samples in scraped.values() for s in samples)
