"""Every message that crosses a process boundary, as pydantic v2 models. docs/protocol.md documents them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

WIRE_VERSION = 1
# The longest text any field may carry (reasons, details, labels); producers truncate to it.
MAX_STR = 4096
# The longest list any message may carry (rollout targets, telemetry records); producers stay under it.
MAX_LIST = 10_000
# Prediction.top: InferenceSettings.top_k is at most this.
MAX_TOP = 1000
# Cameras named in InferenceStats.dropped_by_camera; further cameras are summed under "_other".
MAX_CAMERA_KEYS = 256
# The longest a paced rollout spreads its devices' downloads (RolloutPacing.spread_s), in seconds.
MAX_SPREAD_S = 3600.0


def _empty(value: object) -> bool:
    """A field added after WIRE_VERSION 1 that holds its default (None, or an empty list) is left out of the
    encoding: a receiver older than the field refuses unknown fields, and leaving it out is what keeps a
    new sender's message valid to it while the field says nothing."""
    return value is None or value == []


class _Message(BaseModel):
    # Unknown fields are an error, not silently dropped: a typo in a client shows up at once.
    # NaN and infinity are refused in every float: one `at=inf` would poison S3 partitions, sorting and
    # every statistic computed over it. Strings are bounded so a hostile client's megabyte "label"
    # costs a validation error, not memory in every consumer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_STR)


class Encoding(StrEnum):
    JPEG = "jpeg"
    PNG = "png"


class FrameEnvelope(_Message):
    """A frame with metadata, msgpack-encoded. Raw JPEG/PNG bytes on the frames topic are also accepted."""

    # Strict where a wrong type would otherwise be coerced: a number is not a frame id, text is not bytes.
    frame_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    encoding: Encoding
    data: Annotated[bytes, Field(strict=True, min_length=1)]
    # The camera's wall clock, seconds since the epoch. Informational only: latency figures come
    # from the receiving service's monotonic clock, because device clocks disagree.
    captured_at: float | None = None


class ClassScore(_Message):
    index: int
    label: str
    score: float


class Timings(_Message):
    """Milliseconds on the inference service's monotonic clock, from the frame's arrival."""

    queued_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int


class ModelRef(_Message):
    name: str
    version: int
    sha256: str


# What Prediction.features holds: per-channel mean and standard deviation of the model's input
# tensor, and its sharpness (mean absolute difference of horizontally adjacent values).
INPUT_FEATURES = ("mean_c0", "mean_c1", "mean_c2", "std_c0", "std_c1", "std_c2", "sharpness")


class CacheSource(_Message):
    """Where a cached prediction's answer was computed: the frame the model really ran on."""

    frame_id: str
    age_ms: float = Field(ge=0)
    # exact: the same pixels as a frame the model answered (its bytes less camera metadata); scene: a
    # thumbnail within the change threshold.
    match: Literal["exact", "scene"]


class CascadeAnswer(_Message):
    """Which stage of a cascade answered a frame (1: the small model stood; 2: escalated)."""

    stage: Literal[1, 2]
    small: ModelRef
    large: ModelRef
    # Stage 1's top-1 margin or confidence (the cascade's metric) for this frame.
    score: float


class Prediction(_Message):
    v: int = WIRE_VERSION
    device: str
    camera: str
    frame_id: str
    captured_at: float | None
    # Bounded like every list that crosses a broker (a hostile list costs a validation error, not
    # memory): top_k is at most 1000, INPUT_FEATURES has 7 entries.
    top: Annotated[list[ClassScore], Field(max_length=MAX_TOP)]
    model: ModelRef
    provider: str
    timings: Timings
    published_at: float
    # Statistics of the model's input for this frame, for drift detection (see INPUT_FEATURES).
    features: Annotated[list[float], Field(max_length=64)] | None = None
    # True when this answer came from the scene cache, not from a model run on this frame; `cache`
    # then says which frame the model really ran on and how old that answer is.
    cached: bool = False
    cache: CacheSource | None = None
    # Set when `model` is a cascade: which stage answered, and the two members.
    cascade: CascadeAnswer | None = None
    # The plugins (docs/plugins.md) that replaced this prediction's classes, in the order they ran.
    changed_by: Annotated[list[str], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _cached_names_its_source(self) -> Prediction:
        if self.cached != (self.cache is not None):
            raise ValueError("a cached prediction names its source (cache), and only a cached one")
        return self


class ErrorReason(StrEnum):
    UNDECODABLE = "undecodable"
    OVERSIZED = "oversized"
    MALFORMED_ENVELOPE = "malformed_envelope"
    EMPTY = "empty"
    PROVIDER_FALLBACK = "provider_fallback"
    INTERNAL = "internal"
    MALFORMED_COMMAND = "malformed_command"  # a control message (e.g. a model switch) that does not parse
    # A plugin's call failed (trap, budget or deadline exhausted, malformed result, a message outside its
    # topic): the prediction went on as it came in. After too many in a window the plugin is disabled.
    PLUGIN_FAULT = "plugin_fault"
    PLUGIN_DISABLED = "plugin_disabled"
    # A frame on a topic whose camera level is not a camera id (shared.topics.check_id): the camera names
    # the prediction's topic, the counters and the metrics, so such a frame is refused before any of them.
    INVALID_CAMERA = "invalid_camera"


class ErrorReport(_Message):
    v: int = WIRE_VERSION
    device: str
    service: str
    reason: ErrorReason
    detail: str
    camera: str | None = None
    frame_id: str | None = None
    at: float
    plugin: ModelRef | None = None  # the plugin a PLUGIN_FAULT or PLUGIN_DISABLED names


class ServiceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class ProviderReport(_Message):
    # ONNX Runtime knows about twenty execution providers.
    requested: Annotated[list[str], Field(max_length=64)]
    available: Annotated[list[str], Field(max_length=64)]
    active: str
    fallback: bool


class InferenceStats(_Message):
    frames_received: int = 0
    frames_rejected: int = 0
    frames_dropped: int = 0
    predictions_published: int = 0
    # Predictions the MQTT client refused (its queue full, or QoS 0 while disconnected): never sent.
    predictions_lost: int = 0
    batches: int = 0
    # Of the predictions above: answered from the scene cache (no model run), and answered by a
    # cascade's stage 2 (escalated).
    predictions_cached: int = 0
    predictions_escalated: int = 0
    # Predictions a plugin dropped (never published: the plugin's decision, not a loss).
    predictions_dropped_by_plugins: int = 0
    queue_depth: int = 0
    # Drops by camera, at most MAX_CAMERA_KEYS cameras named; the rest are summed under "_other".
    dropped_by_camera: Annotated[dict[str, int], Field(max_length=MAX_CAMERA_KEYS + 1)] = Field(default_factory=dict)


class TelemetryStats(_Message):
    queue_records: int
    queue_bytes: int
    next_seq: int
    dropped: dict[str, int]  # by gap reason: queue_full, expired, damaged, dead_lettered, write_failed
    batches_sent: int
    batches_resent: int
    records_acknowledged: int
    open_alerts: list[str]
    outbox_repaired: str | None = None
    epoch: str | None = None  # the outbox's epoch (see TelemetryBatch.epoch)
    records_refused: int = 0  # records that failed validation before the outbox: never stored, never sent
    batches_dead_lettered: int = 0  # batches given up (by the cloud or after too many attempts)
    docker_errors: int = 0  # failed Docker API calls (EDGEFLEET_DOCKER_URL set, the engine unreachable or refusing)


class PluginState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"  # too many faults in the window: skipped until another version is switched in


class PluginStatus(_Message):
    """One plugin as the inference service runs it: counted since it was switched in."""

    plugin: ModelRef
    state: PluginState
    calls: int = 0
    faults: int = 0
    dropped: int = 0
    replaced: int = 0
    emitted: int = 0
    last_fault: str | None = None


class ServiceStatus(_Message):
    v: int = WIRE_VERSION
    device: str
    service: str
    state: ServiceState
    at: float
    edgefleet_version: str
    # Why the service went offline: "shutdown" when it stopped cleanly, "connection lost" from the will.
    reason: str | None = None
    model: ModelRef | None = None
    provider: ProviderReport | None = None
    inference: InferenceStats | None = None
    telemetry: TelemetryStats | None = None
    plugins: Annotated[list[PluginStatus], Field(max_length=64)] | None = None  # inference: the plugins it runs


# -- model delivery ------------------------------------------------------------------------------------


class ModelSwitch(_Message):
    """sync -> inference: load the model in `model_dir` (it must have this SHA-256), warm it, serve it."""

    v: int = WIRE_VERSION
    request_id: str
    model_dir: str
    sha256: str
    at: float  # wall clock at sending; sync and inference share the device's clock
    # The switch's deadline, seconds from `at` (and, against clock steps, from receipt too): inference
    # discards a load that finishes later and answers ok=False "late", so a switch sync gave up on can
    # never land afterwards. None: no deadline (older senders).
    timeout_s: float | None = Field(None, gt=0, le=86400)


class ModelSwitched(_Message):
    """inference -> sync: the switch is done (`ok`) and which model now serves, or why it failed."""

    v: int = WIRE_VERSION
    request_id: str
    ok: bool
    serving: ModelRef
    load_ms: float | None = None
    error: str | None = None
    at: float


class PluginLoad(_Message):
    plugin: ModelRef
    # The installed plugin's folder relative to the plugin store's root (sync and inference may mount the
    # store at different paths); inference resolves it under its own EDGEFLEET_PLUGINS_DIR and refuses
    # one that leaves it.
    folder: str


class PluginSwitch(_Message):
    """sync -> inference: run exactly these plugins (in order) from the next batch on. Each folder is
    checked against its SHA-256 and compiled before anything changes; an empty list runs none."""

    v: int = WIRE_VERSION
    request_id: str
    plugins: Annotated[list[PluginLoad], Field(max_length=64)]
    at: float
    timeout_s: float | None = Field(None, gt=0, le=86400)


class PluginSwitched(_Message):
    """inference -> sync: the plugin set now running (`ok`), or why the switch was refused."""

    v: int = WIRE_VERSION
    request_id: str
    ok: bool
    serving: Annotated[list[ModelRef], Field(max_length=64)]
    load_ms: float | None = None
    error: str | None = None
    at: float


class RolloutPhase(StrEnum):
    CANARY = "canary"  # the share of the target chosen by hash installs it
    PROMOTED = "promoted"  # every device of the target installs it
    ABORTED = "aborted"  # every device that installed it goes back to the model it had before


class RolloutTarget(_Message):
    """Which devices: all (no devices, no groups), listed devices, or members of groups; then `share`
    of those, chosen by a hash of device id and rollout id (stable: the same devices every time)."""

    devices: Annotated[list[str], Field(max_length=MAX_LIST)] = Field(default_factory=list)
    groups: Annotated[list[str], Field(max_length=MAX_LIST)] = Field(default_factory=list)
    share: float = Field(1.0, gt=0, le=1)
    # The canary by name: while the rollout is not promoted, exactly these devices of the target install
    # it and `share` only records what the operator asked for. The operator's CLI names them (ranked by
    # the devices' own hash), so a small fleet gets an exact count. Empty (older rollouts): `share` decides.
    # Left out of the encoding while empty, so a device older than the field (which refuses unknown
    # fields) still accepts a rollout that names no canary.
    canary_devices: Annotated[list[str], Field(max_length=MAX_LIST)] = Field(default_factory=list,
                                                                             exclude_if=_empty)


class RolloutPacing(_Message):
    """How a rollout spreads its downloads: a fleet must not stampede the registry, all its devices
    fetching in the same second. Each targeted device's turn is pacing_position * spread_s after
    issued_at, and it waits what is left of it before it fetches the manifest (pacing_position: its
    place in [0, 1) by a hash of rollout id and device id, independent of the canary draw, so a uniform
    ramp with no device knowing the others; services.sync.membership.start_delay).
    max_concurrent is the operator's intent the spread was sized for (about that many downloads at
    once); it is informational: no device can count the others."""

    spread_s: float = Field(0.0, ge=0, le=MAX_SPREAD_S)
    max_concurrent: int = Field(0, ge=0)


class _RolloutFields(_Message):
    """What every rollout carries, a model's (Rollout) or a plugin's (PluginRollout)."""

    v: int = WIRE_VERSION
    rollout_id: Annotated[str, Field(min_length=1, max_length=64)]
    version: int = Field(ge=1)
    phase: RolloutPhase
    target: RolloutTarget
    # An explicit rollback to an older version is allowed only with this set; otherwise a device
    # refuses a version older than the one it serves.
    allow_downgrade: bool = False
    issued_at: float
    # Left out of the encoding while None (no pacing: every device starts at once), so a device older
    # than the field (which refuses unknown fields) still accepts a rollout that is not paced.
    pacing: RolloutPacing | None = Field(None, exclude_if=_empty)


class Rollout(_RolloutFields):
    model: str

    @property
    def artifact(self) -> tuple[str, int]:
        """The model and version asked for (a PluginRollout's `artifact` has the same shape)."""
        return self.model, self.version


class PluginRollout(_RolloutFields):
    """A plugin's rollout, retained on its own topic (topics.plugin_rollout): plugins roll out beside the
    model, never in its place. Phases and targets mean what they mean for a model's Rollout; aborting a
    plugin's first version removes the plugin."""

    plugin: str

    @property
    def artifact(self) -> tuple[str, int]:
        """The plugin and version asked for (a model Rollout's `artifact` has the same shape)."""
        return self.plugin, self.version


class SyncState(StrEnum):
    IDLE = "idle"
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    NOT_TARGETED = "not_targeted"


class CanaryVerdict(_Message):
    """The new model against the one before it on the same device, each over its own window."""

    samples_before: int
    samples_after: int
    error_rate_before: float
    error_rate_after: float
    latency_p95_before_ms: float | None
    latency_p95_after_ms: float | None
    mean_confidence_before: float | None
    mean_confidence_after: float | None
    prediction_psi: float | None
    passed: bool
    reasons: list[str]
    # False when either window had fewer than the minimum samples: no verdict, and no verdict never
    # keeps a model (it is rolled back, or held but reported as not passed).
    conclusive: bool = True


class SyncReport(_Message):
    v: int = WIRE_VERSION
    device: str
    rollout_id: str | None
    state: SyncState
    target: ModelRef | None = None
    serving: ModelRef | None = None
    reason: str | None = None
    progress_bytes: int | None = None
    canary: CanaryVerdict | None = None
    at: float


# -- telemetry -----------------------------------------------------------------------------------------


class AlertType(StrEnum):
    CONFIDENCE_DRIFT = "confidence_drift"
    PREDICTION_DRIFT = "prediction_drift"  # PSI of the predicted-class distribution
    FEATURE_DRIFT = "feature_drift"  # z-score of the input statistics
    LATENCY = "latency"
    PROVIDER_FALLBACK = "provider_fallback"


class AlertState(StrEnum):
    RAISED = "raised"
    RESOLVED = "resolved"


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class Alert(_Message):
    kind: Literal["alert"] = "alert"
    device: str
    alert_id: str  # one incident: the same id when it is raised and when it is resolved
    type: AlertType
    state: AlertState
    severity: Severity
    value: float
    threshold: float
    window: int  # samples the value was measured over
    model: ModelRef | None = None
    detail: str
    at: float


class ContainerSample(_Message):
    name: str
    cpu_percent: float  # of one core, as `docker stats` shows it: 200.0 is two cores busy
    memory_bytes: int  # usage less the inactive page cache, as `docker stats` shows it
    # Added with the Docker sampler thread; absent in samples from older devices.
    memory_limit_bytes: int | None = None  # the container's limit (the host's memory where it has none)
    at: float | None = None  # when Docker read these figures: a sample's `at` minus this is their age


class ResourceSample(_Message):
    kind: Literal["metric"] = "metric"
    device: str
    cpu_percent: float
    memory_percent: float
    memory_used_bytes: int
    disk_percent: float
    temperatures_c: dict[str, float] = Field(default_factory=dict)
    containers: list[ContainerSample] = Field(default_factory=list)
    queue_bytes: int = 0
    queue_records: int = 0
    at: float


class DriftSample(_Message):
    """Telemetry's periodic measure of the model a device serves (every EDGEFLEET_DRIFT_SAMPLE_INTERVAL_S):
    the drift detector's current scores and the inference latency over the window. The fleet console
    charts these from S3 (telemetry/drift/...); alerts stay the incidents."""

    kind: Literal["drift"] = "drift"
    device: str
    model: ModelRef | None = None
    scores: Annotated[dict[AlertType, float], Field(max_length=len(AlertType))]  # the measure by kind
    samples: int = Field(ge=0)  # predictions in the window the scores were measured over
    latency_p50_ms: float | None = None  # Prediction.timings.total_ms over the window
    latency_p95_ms: float | None = None
    at: float


class HardExample(_Message):
    # JSON (the lake's line format) carries the image as base64; msgpack carries raw bytes.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_STR,
                              ser_json_bytes="base64", val_json_bytes="base64")

    kind: Literal["hard_example"] = "hard_example"
    device: str
    encoding: Encoding
    data: bytes
    prediction: Prediction
    at: float


class GapReason(StrEnum):
    QUEUE_FULL = "queue_full"
    EXPIRED = "expired"
    DAMAGED = "damaged"
    # Given up: the cloud could not store the batch (it is in its dead letters) or it went unacknowledged
    # `forward_max_attempts` times; the records are kept in the outbox's local dead-letter table.
    DEAD_LETTERED = "dead_lettered"
    # Taken from memory but never committed: the outbox's write failed (disk full) and the process exited.
    WRITE_FAILED = "write_failed"


class Gap(_Message):
    """Records the outbox lost on purpose or by damage: which sequence numbers, how many, why."""

    kind: Literal["gap"] = "gap"
    device: str
    first_seq: int
    last_seq: int
    count: int
    reason: GapReason
    at: float
    detail: str | None = None  # why, in words (a dead letter's validation error)


RecordBody = Annotated[Alert | ResourceSample | HardExample | Gap | DriftSample, Field(discriminator="kind")]


class TelemetryRecord(_Message):
    seq: int = Field(ge=1)  # per device, gapless at the source: the cloud proves completeness with it
    body: RecordBody


# A telemetry store's id (shared.lake.StoreMarker): 32 lowercase hex digits, made once with the store.
STORE_ID_PATTERN = r"^[0-9a-f]{32}$"


# The acknowledgement ranges a batch carries: the most recent stores to acknowledge records of the epoch.
MAX_ACK_RANGES = 8


class AckRange(_Message):
    """Every number first_seq..last_seq of an outbox epoch was acknowledged by one telemetry store: one
    range per run of consecutive numbers that store acknowledged (a number the device dropped itself is in
    none), kept by the outbox and sent with every batch. The audit of a store that finds numbers missing
    inside the range of a store that never wrote to its bucket knows they were sent before it existed;
    inside its own, that it lost them."""

    store: str = Field(pattern=STORE_ID_PATTERN)
    first_seq: int = Field(ge=1)
    last_seq: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AckRange:
        if self.last_seq < self.first_seq:
            raise ValueError(f"last_seq {self.last_seq} is below first_seq {self.first_seq}")
        return self


class TelemetryBatch(_Message):
    v: int = WIRE_VERSION
    device: str
    # The outbox's epoch: a random id made with the outbox file. A lost or repaired outbox starts a new
    # epoch, so its sequence numbers (which start again) never name an object an older epoch wrote.
    epoch: str = Field(pattern=r"^[0-9a-f]{8}$")
    # TelemetrySettings.batch_max_records is bounded by the same MAX_LIST.
    records: list[TelemetryRecord] = Field(min_length=1, max_length=MAX_LIST)
    sent_at: float
    # Which stores acknowledged which records of this epoch so far, oldest first (empty: none yet, or an
    # older device); cloud_ingest keeps them in the batch's index for the audit.
    # Left out of the encoding while empty, so an ingest older than the field accepts the batch.
    acknowledged: list[AckRange] = Field(default_factory=list, max_length=MAX_ACK_RANGES, exclude_if=_empty)

    @property
    def batch_id(self) -> str:
        """Epoch, first and last sequence number: the same batch resent has the same id (and S3 keys)."""
        return f"{self.epoch}-{self.records[0].seq:012d}-{self.records[-1].seq:012d}"


class TelemetryAck(_Message):
    v: int = WIRE_VERSION
    device: str
    batch_id: str
    stored: int
    dead_lettered: bool = False
    at: float
    # The id of the store that holds the batch (shared.lake.StoreMarker); None from an older ingest.
    # Left out of the encoding while None, so a device older than the field accepts the ack.
    store: str | None = Field(None, pattern=STORE_ID_PATTERN, exclude_if=_empty)
