"""Typed configuration for every service: environment (EDGEFLEET_*) over an optional TOML file over
defaults. Every config key is defined here, once; a bad value fails at start naming its key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared import topics
from shared.codec import WireFormat
from shared.errors import EdgefleetError
from shared.plugin import (
    MAX_DEADLINE_MS,
    MAX_EMIT_BYTES,
    MAX_EMITS,
    MAX_FUEL,
    MAX_INFER_CALLS,
    MAX_MEMORY_PAGES,
    MAX_RESULT_BYTES,
)
from shared.schemas import MAX_LIST

ENV_PREFIX = "EDGEFLEET_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
SECRETS_DIR_ENV = f"{ENV_PREFIX}SECRETS_DIR"
DEFAULT_MODEL_DIR = Path("var/models/efficientnet-lite0")

S = TypeVar("S", bound="CommonSettings")


class ConfigError(EdgefleetError):
    """A bad config, found at start: the message names the key (its EDGEFLEET_* variable and, where one
    was given, the TOML file). The CLI prints it and exits 2; a library caller decides for itself."""


class Group(BaseModel):
    """A group of keys that belong together (the broker link, the canary, drift): its consumer takes it
    whole. Its keys keep their flat names everywhere outside Python: EDGEFLEET_CANARY_WINDOW in the
    environment, canary_window (or window under [canary]) in the TOML file, edgefleet_canary_window as
    a secret file."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class MqttSettings(Group):
    url: str = Field("mqtt://127.0.0.1:1883", description="The device's broker, mqtt://host:port (mqtts:// for TLS).")
    username: str | None = Field(None, description="Broker user name, where the broker asks for one.")
    password: SecretStr | None = Field(
        None, description="Broker password (prefer a mounted secret file over the environment).")
    ca_file: Path | None = Field(
        None, description="With mqtts://: the CA that signed the broker's certificate (default: the system's).")
    cert_file: Path | None = Field(
        None, description="With mqtts://: this client's certificate, where the broker asks for one.")
    key_file: Path | None = Field(None, description="With mqtts://: this client's private key.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First delay before reconnecting to a lost broker.")
    reconnect_max_s: float = Field(
        10.0, gt=0, description="Longest delay between reconnect attempts (backoff doubles up to it).")

    @field_validator("url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return broker_url(value)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


def broker_url(value: str) -> str:
    """Checks an mqtt:// or mqtts:// URL, raising ValueError (which pydantic names with its key) if not."""
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("must look like mqtt://host:port or mqtts://host:port")
    _ = parts.port  # raises ValueError for a port out of range or not a number
    return value


class LogSettings(Group):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log threshold.")
    format: Literal["json", "text"] = Field("json", description="json: one object per line; text: for people.")


class HealthSettings(Group):
    file: Path | None = Field(
        None, description="A file the service rewrites while it is healthy (broker link up, every worker loop coming "
        "round), with its pid: what `edgefleet health FILE` (the images' HEALTHCHECK, the k3s probes) reads. "
        "Unset: none.")
    interval_s: float = Field(
        5.0, gt=0, le=60, description="How often the service checks itself and rewrites the health file.")


class CommonSettings(BaseSettings):
    """What every service and tool reads: its broker, its device, its logs and its health. Read by
    `load()`, which layers defaults < TOML file < secret files < environment < explicit overrides."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True,
        # EDGEFLEET_CANARY_WINDOW fills canary.window: the first "_" after a group's name opens the group,
        # and no further one does (window_s stays one key), so every flat name keeps working.
        env_nested_delimiter="_", env_nested_max_split=1,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="The link to the device's broker.")
    device_id: str = Field("device-1", description="This device's id: the <device> level of every topic.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    status_interval_s: float = Field(
        5.0, gt=0, description="How often the retained status (with counters) is refreshed.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="The health file.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics (shared/metrics.py) over HTTP at "
        "http://<metrics_host>:<port>/metrics. Unset: none; 0: a free port, logged at start.")
    metrics_host: str = Field(
        "127.0.0.1", description="The address the metrics endpoint listens on (0.0.0.0 in a container, so "
        "Prometheus can reach it).")
    liveness_s: float = Field(
        30.0, gt=0, description="A worker loop that has not come round for this long (beyond a wait it announced, e.g. "
        "an S3 timeout) makes the service unhealthy, like a missed systemd watchdog ping.")
    hang_exit_s: float = Field(
        120.0, ge=0, description="A worker loop stuck for this long ends the process (exit 70), so the container's "
        "restart policy brings it back: Docker does not restart a container for being unhealthy. 0: never; else at "
        "least liveness_s.")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_into_groups(cls, values: Any) -> Any:
        # SyncSettings(canary_window=20) works as load() does: a flat keyword beats its group from the environment.
        return regroup(cls, values) if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _hang_after_liveness(self) -> Self:
        if self.hang_exit_s and self.hang_exit_s < self.liveness_s:
            raise ValueError(
                f"hang_exit_s ({self.hang_exit_s:g}) must be 0 or at least liveness_s ({self.liveness_s:g})")
        return self

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str) -> str:
        return topics.check_id("device", value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file and the secret files are layered by load(), which knows where they are; built
        # directly, settings read the keyword arguments over the environment.
        return (init_settings, env_settings)


ProviderList = Annotated[list[str], NoDecode]


class CacheSettings(Group):
    """The scene cache: frames of a fixed camera that show what the model last saw are answered from its
    last answer, without a model run."""

    enabled: bool = Field(False, description="Answer repeated frames and unchanged scenes from the cache.")
    threshold: float = Field(
        2.0, ge=0, le=255,
        description="Largest mean absolute difference (grey levels, 0-255) between a frame's grey thumbnail "
        "and that of the last frame the model ran on, for the scene to count as unchanged.")
    thumbnail: int = Field(32, ge=8, le=256, description="Side of the grey thumbnail, in pixels.")
    max_age_s: float = Field(
        5.0, gt=0, description="A cached answer older than this is not given again: the model runs.")
    max_consecutive: int = Field(
        10, ge=1, description="At most this many cached answers in a row per camera, then the model runs (so a "
        "slow drift below the threshold is always re-checked).")
    exact_entries: int = Field(
        256, ge=0, le=100_000, description="Answers remembered by the exact pixels of their frame (its image "
        "bytes less the metadata cameras stamp into each frame; 0: none).")
    min_margin: float = Field(
        0.20, ge=0, le=1,
        description="An unchanged scene gets the cached answer only if its top-1 probability beats the runner-up's "
        "by this much: an unsure answer flips with sensor noise, so the model sees each frame. Measured on the "
        "11 bundled photos with sensor noise (sigma 2): the model's answers to two noisy frames of one scene agree "
        "91.2 % of the time; 98.8 % where the first answer's margin is at least 0.05, 99.7-99.9 % from 0.10. But "
        "one frame's margin is itself noisy: on a photo the model is unsure of (90th percentile of its margin "
        "0.08-0.11 under that noise) a frame in the tail passes 0.10 and its answer is reused up to "
        "max_consecutive times while 8-17 % of that scene's frames get another top-1. bench pipeline's cached "
        "answers agreed 99.7 % at 0.10 in one run and 98.6 % in another (10 of 707, on three such photos). The "
        "photos whose answers flip reach at most 0.11 (90th percentile, 60 noisy frames each); at 0.20 only "
        "answers of photos whose top-1 holds under noise are reused (rocket, flower when a frame reaches it: "
        "margins 0.19-0.24; coffee, camera: 0.94-0.96).")


DEFAULT_PLUGIN_DIR = Path("var/plugins")


class PluginStoreSettings(Group):
    """Where sync installs WebAssembly plugins (docs/plugins.md) and inference finds the active set."""

    dir: Path = Field(
        DEFAULT_PLUGIN_DIR, description="The plugin store: sync installs plugins and writes the active set here; "
        "inference runs the active set (mount it read-only into inference).")


class PluginSettings(PluginStoreSettings):
    """WebAssembly plugins in inference: the store, the precompiled modules, and the ceilings this device
    puts on what any plugin's manifest asks for."""

    cache_dir: Path = Field(
        Path("var/plugin-cache"), description="Inference's precompiled modules, keyed by wasmtime version and "
        "module SHA-256 (private to inference: it loads native code from here).")
    fault_limit: int = Field(5, ge=1, le=10_000, description="Faults within fault_window_s that disable a plugin.")
    fault_window_s: float = Field(60.0, gt=0, le=86400, description="The window plugin faults are counted over.")
    max_memory_pages: int = Field(
        1024, ge=1, le=MAX_MEMORY_PAGES, description="Most linear memory any plugin gets, in 64 KiB pages.")
    max_fuel: int = Field(100_000_000, ge=1000, le=MAX_FUEL, description="Most fuel any plugin call gets.")
    max_deadline_ms: int = Field(
        200, ge=1, le=MAX_DEADLINE_MS, description="Longest wall time any plugin call gets, host calls included.")
    max_result_bytes: int = Field(
        256 << 10, ge=16, le=MAX_RESULT_BYTES, description="Largest result document any plugin may return.")
    max_emits: int = Field(8, ge=0, le=MAX_EMITS, description="Most messages any plugin call may emit.")
    max_emit_bytes: int = Field(
        64 << 10, ge=1, le=MAX_EMIT_BYTES, description="Largest message payload any plugin may emit.")
    max_infer_calls: int = Field(
        2, ge=0, le=MAX_INFER_CALLS, description="Most `infer`/`infer_tensor` calls any plugin call may make.")
    allowed_dirs: Annotated[list[Path], NoDecode] = Field(
        [], description="Absolute host folders a plugin's manifest may grant (read-only), comma-separated; a grant "
        "whose folder (symlinks resolved) is not inside one of them is refused. Empty: no folder can be granted.")

    @field_validator("allowed_dirs", mode="before")
    @classmethod
    def _allowed_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [d.strip() for d in value.split(",") if d.strip()]
        if isinstance(value, list) and any(not Path(d).is_absolute() for d in value):
            raise ValueError("every allowed plugin folder must be an absolute path")
        return value


class InferenceSettings(CommonSettings):
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Folder holding model.onnx and manifest.json.")
    providers: ProviderList = Field(
        ["cpu"],
        description="Execution providers in order of preference, comma-separated: "
        "tensorrt, cuda, openvino, coreml, dml, cpu (or ONNX Runtime's full names).",
    )
    provider_policy: Literal["warn", "strict"] = Field(
        "warn",
        description="When the first provider is not the one really active: warn (serve on the fallback, "
        "report and alert) or strict (refuse to start).",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Model runs in parallel, each taking its own batches. 0: one per core when the first "
        "provider is the CPU (each run single-threaded, which beats one run spread over every core on "
        "small CPUs), else one.",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per run; 0: 1 with several workers, else ONNX Runtime's default "
        "(one per core of the machine), or one per core this process may use where that is fewer."
    )
    max_batch: int = Field(8, ge=1, le=256, description="Most frames inferred together, across cameras.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a batch may wait for more frames after its first. 0 takes what is queued "
        "at once: batches still grow under load, and an idle service adds no latency.",
    )
    queue_size: int = Field(64, ge=1, le=100_000, description="Frames held before the oldest are dropped.")
    max_frame_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Larger frames are rejected with an 'oversized' error; an envelope "
        "declared msgpack+zlib is also refused if it inflates past this."
    )
    max_frame_pixels: int = Field(
        25_000_000, ge=1024, le=1_000_000_000,
        description="Largest width x height a frame may declare in its JPEG/PNG header; larger ones are rejected "
        "with an 'oversized' error before any decoding (a 200 KB PNG can declare 8000x8000).",
    )
    scaled_decode: bool = Field(
        True,
        description="Decode JPEGs at least twice the model's size at 1/2, 1/4 or 1/8 scale (DCT domain): "
        "less work per HD frame; false decodes every pixel.",
    )
    top_k: int = Field(5, ge=1, le=1000, description="Classes per prediction.")
    prediction_qos: int = Field(
        1, ge=0, le=1,
        description="MQTT QoS of predictions and error reports: 1 survives a broker hiccup, 0 is cheaper."
    )
    prediction_format: WireFormat = Field(
        WireFormat.JSON, description="json (readable by any client) or msgpack; the MQTT v5 content type says which."
    )
    cache: CacheSettings = Field(default_factory=CacheSettings, description="The scene cache.")
    plugins: PluginSettings = Field(default_factory=PluginSettings, description="WebAssembly plugins.")

    @field_validator("cache")
    @classmethod
    def _cache_sees_the_margin(cls, cache: CacheSettings, info: ValidationInfo) -> CacheSettings:
        # The cache judges an answer sure by its top-1 margin over the runner-up: a prediction of one
        # class carries no runner-up, and every answer would look sure.
        if cache.enabled and info.data.get("top_k", 2) < 2:
            raise ValueError("cache_enabled needs top_k of at least 2 (the cache reuses only answers whose top-1 "
                             "beats the runner-up by cache_min_margin)")
        return cache

    @field_validator("providers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("name at least one execution provider")
        return value


class CameraSettings(CommonSettings):
    cameras: Annotated[list[str], NoDecode] = Field(["cam-1"], description="Camera ids, comma-separated.")
    rate_hz: float = Field(5.0, gt=0, le=10_000, description="Frames per second, per camera.")
    source: str = Field(
        "bundled",
        description="bundled (real photos shipped with scikit-image), a folder of images, "
        "a video file, or a capture device number.",
    )
    envelope: bool = Field(False, description="Send msgpack envelopes (frame id, capture time) instead of raw bytes.")
    count: int = Field(0, ge=0, description="Frames per camera before stopping; 0 runs until stopped.")

    @field_validator("cameras", mode="before")
    @classmethod
    def _cameras(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [c.strip() for c in value.split(",") if c.strip()]
        if not value:
            raise ValueError("name at least one camera")
        return [topics.check_id("camera", c) for c in value]


class S3Settings(Group):
    """Any S3-compatible store, reached through boto3. Credentials come from these keys or, when unset,
    from boto3's own chain (AWS_* variables, profiles, instance roles)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio:9000; unset: AWS S3.")
    region: str = Field("us-east-1", description="S3 region.")
    access_key_id: str | None = Field(None, description="S3 access key id (unset: boto3's credential chain).")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key (prefer a mounted secret).")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError("must look like http://host:port or https://host")
        return value


class StoreSettings(CommonSettings):
    """Where the model registry lives."""

    s3: S3Settings = Field(default_factory=S3Settings, description="The S3 store.")
    registry_bucket: str = Field("edgefleet-models", min_length=3, max_length=63, description="The registry's bucket.")


DEFAULT_STORE_DIR = Path("var/store")
DEFAULT_KEY_DIR = Path("var/keys")


class DownloadSettings(Group):
    chunk_bytes: int = Field(1 << 20, ge=4096, description="Bytes per ranged GET while downloading.")
    limit_bytes_s: int = Field(
        0, ge=0, description="Bandwidth cap for model downloads on metered links, bytes/s; 0: none.")
    timeout_s: float = Field(10.0, gt=0, description="A stalled read or connection gives up after this.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest wait between download retries (backoff).")


class CanarySettings(Group):
    """How a new model is judged against the one it replaces, on live traffic."""

    window: int = Field(50, ge=5, description="Predictions compared on each side of a switch.")
    warmup: int = Field(
        10, ge=0, description="A model's first predictions, left out of its canary window while it warms up.")
    timeout_s: float = Field(
        600.0, gt=0, description="A canary whose window does not fill in this time is judged on what it has.")
    min_samples: int = Field(
        20, ge=1, description="Fewer predictions than this on either side of a switch make the canary inconclusive "
        "(it never keeps a model); at most canary_window.")
    inconclusive: Literal["rollback", "hold"] = Field(
        "rollback", description="An inconclusive canary (no traffic before its timeout): roll back, or hold the new "
        "model and report it as not passed.")
    max_psi: float = Field(0.5, gt=0, description="Roll back when the predicted-class PSI (new vs old) exceeds this.")
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description=
        "Roll back when the new model's error rate exceeds the old one's by more than this.")
    max_latency_ratio: float = Field(
        1.5, gt=0, description="Roll back when p95 latency grows by more than this factor.")
    max_confidence_drop: float = Field(
        0.2, ge=0, le=1, description="Roll back when mean top-1 confidence falls by more than this.")

    @model_validator(mode="after")
    def _min_fits_window(self) -> Self:
        if self.min_samples > self.window:
            raise ValueError(f"canary_min_samples ({self.min_samples}) exceeds canary_window ({self.window})")
        return self


class SyncSettings(StoreSettings):
    model_store: Path = Field(
        DEFAULT_STORE_DIR,
        description="The device's model store: versions/, staging/, fallback/ and the 'current' link "
        "that inference serves from (point EDGEFLEET_MODEL_DIR at <store>/current).",
    )
    seed_model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="The model copied into an empty store as its fallback, which is never removed."
    )
    trusted_keys_dir: Path = Field(DEFAULT_KEY_DIR, description="Operator public keys (*.pub, PEM) this device trusts.")
    groups: Annotated[list[str], NoDecode] = Field([], description="Groups this device belongs to, comma-separated.")
    keep_versions: int = Field(3, ge=1, le=100, description="Installed versions kept (the fallback comes on top).")
    download: DownloadSettings = Field(default_factory=DownloadSettings, description="Model downloads.")
    switch_timeout_s: float = Field(
        120.0, gt=0, le=86400,
        description="How long inference may take to load and warm a model: the switch's deadline, which "
        "inference honours (a load finishing later is discarded and the switch fails)."
    )
    canary: CanarySettings = Field(default_factory=CanarySettings, description="The canary.")
    plugins: PluginStoreSettings = Field(default_factory=PluginStoreSettings, description="WebAssembly plugins.")

    @field_validator("groups", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [g.strip() for g in value.split(",") if g.strip()]
        return [topics.check_id("group", g) for g in value]


class CloudLinkSettings(Group):
    """The cloud broker the outbox forwards to; TLS files are the device link's (mqtt_ca_file ...)."""

    url: str = Field("mqtt://127.0.0.1:1884", description="The cloud broker the outbox forwards to.")
    username: str | None = Field(None, description="User name on the cloud broker.")
    password: SecretStr | None = Field(None, description="Password on the cloud broker.")

    @field_validator("url")
    @classmethod
    def _cloud_url(cls, value: str) -> str:
        return broker_url(value)


class OutboxSettings(Group):
    path: Path = Field(Path("var/telemetry/outbox.db"), description="The durable outbox (SQLite).")
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024, description="The outbox's byte cap.")
    full_policy: Literal["oldest", "newest"] = Field(
        "oldest", description="When the outbox is full: drop the oldest records, or refuse the newest. Both are "
        "counted and sent as gaps."
    )


class TtlSettings(Group):
    """How long each kind of record may wait for the link before it is dropped (and counted as a gap)."""

    metric_s: float = Field(7 * 86400, gt=0, description="How long a resource sample may wait for the link.")
    hard_example_s: float = Field(3 * 86400, gt=0, description="How long a hard example may wait for the link.")
    alert_s: float = Field(30 * 86400, gt=0, description="How long an alert may wait for the link.")

    def by_kind(self) -> dict[str, float]:
        """Seconds by record kind (the `kind` of a telemetry record)."""
        return {"metric": self.metric_s, "hard_example": self.hard_example_s, "alert": self.alert_s}


class BatchSettings(Group):
    max_records: int = Field(500, ge=1, le=MAX_LIST, description="Most records per batch to the cloud.")
    max_bytes: int = Field(256 * 1024, ge=1024, description="Most bytes per batch to the cloud (before compression).")
    linger_s: float = Field(
        0.0, ge=0, le=60, description="A batch short of max_records (and max_bytes) waits until its oldest record is "
        "this old before it is sent (0: at once). Fewer, larger batches: fewer cloud writes and messages per record, "
        "which counts on a metered link and at fleet scale; the cost is this much more delay.")


class ForwardSettings(Group):
    retry_max_s: float = Field(30.0, gt=0, description="Longest wait between attempts while the link is down.")
    max_attempts: int = Field(
        10, ge=1, description="A batch sent this many times without an acknowledgement is given up: moved to the "
        "outbox's dead-letter table and reported to the cloud as a `dead_lettered` gap, so one poison batch cannot "
        "stall the outbox.")


class DockerSettings(Group):
    url: str = Field(
        "", description="The Docker Engine API for per-container CPU and memory, e.g. unix:///var/run/docker.sock "
        "(empty: off). Opt-in: whoever reaches the socket controls the host, read-only mount or not.")
    project: str = Field(
        "", pattern=r"^(\*|[a-z0-9][a-z0-9_-]*)?$",
        description="Report only containers labelled com.docker.compose.project=<this> (empty: the project of the "
        "container telemetry runs in, or every container where it runs in none; *: every container).")

    @field_validator("url")
    @classmethod
    def _docker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("unix", "tcp", "http", "https", "ssh") or not (parts.path or parts.netloc)):
            raise ValueError("must be empty (off) or look like unix:///var/run/docker.sock or tcp://host:2375")
        return value


class DriftSettings(Group):
    """When the served model's predictions, confidence, inputs or latency move away from its baseline.
    Each signal raises an alert past its *_raise and resolves it under its *_clear (hysteresis)."""

    baseline: int = Field(200, ge=10, description="Predictions after a model starts serving that form its baseline.")
    window: int = Field(100, ge=10, description="Recent predictions compared with the baseline.")
    min_samples: int = Field(50, ge=5, description="No drift verdict on fewer predictions than this.")
    psi_raise: float = Field(0.25, gt=0, description="Predicted-class PSI that raises an alert.")
    psi_clear: float = Field(0.1, gt=0, description="PSI under which the alert is resolved (hysteresis).")
    confidence_raise: float = Field(0.15, gt=0, le=1, description="Drop of mean top-1 confidence that raises an alert.")
    confidence_clear: float = Field(0.05, ge=0, le=1, description="Drop under which it is resolved.")
    feature_z_raise: float = Field(
        1.5, gt=0, description="Shift of an input statistic, in baseline standard deviations, that raises an alert.")
    feature_z_clear: float = Field(0.75, gt=0, description="Shift under which it is resolved.")
    latency_raise: float = Field(
        2.0, gt=1, description="p95 inference latency, as a multiple of the baseline's, that raises an alert.")
    latency_clear: float = Field(1.5, gt=1, description="Multiple under which it is resolved.")
    sample_interval_s: float = Field(
        30.0, gt=0, description="How often the current drift scores and latency go to the cloud as a drift "
        "record (charted by the fleet console).")


class TelemetrySettings(CommonSettings):
    cloud_mqtt: CloudLinkSettings = Field(default_factory=CloudLinkSettings, description="The cloud broker.")
    outbox: OutboxSettings = Field(default_factory=OutboxSettings, description="The outbox.")
    ttl: TtlSettings = Field(default_factory=TtlSettings, description="Record lifetimes.")
    flush_interval_s: float = Field(
        0.2, gt=0, le=10, description="Records are committed to disk together at this interval.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batches to the cloud.")
    ack_timeout_s: float = Field(
        10.0, gt=0, description="A batch the cloud has not acknowledged after this many seconds of link-up time "
        "is sent again (the clock pauses while the uplink is down and resumes with what was left).")
    forward: ForwardSettings = Field(default_factory=ForwardSettings, description="Forwarding.")
    resource_interval_s: float = Field(10.0, gt=0, description="How often host and container resources are sampled.")
    docker: DockerSettings = Field(default_factory=DockerSettings, description="The Docker API.")
    drift: DriftSettings = Field(default_factory=DriftSettings, description="Drift detection.")
    hard_example_confidence: float = Field(
        0.3, gt=0, le=1, description="Frames whose top-1 confidence is below this are hard examples.")
    hard_examples_per_minute: float = Field(6.0, ge=0, description="Most hard examples forwarded per minute (0: none).")

    def cloud(self) -> TelemetrySettings:
        """These settings with the cloud broker as their broker link (same device id and TLS files)."""
        link = self.mqtt.model_copy(update={
            "url": self.cloud_mqtt.url, "username": self.cloud_mqtt.username, "password": self.cloud_mqtt.password})
        return self.model_copy(update={"mqtt": link})


class IngestGroupSettings(Group):
    workers: int = Field(4, ge=1, le=64, description="Batches written to S3 at once.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps a replica's session (and the batches it took but did not "
        "acknowledge) after the replica is gone; a replica restarted with the same id gets them again.")
    flush_s: float = Field(
        1.0, ge=0, le=60, description="How long a replica gathers batches (of every device) before writing them as "
        "one flush: one S3 object per record kind and one index, instead of 2+ PUTs per batch (S3's request rate "
        "and bill). A batch is acknowledged only once its flush is written, so this adds up to as much to its "
        "latency; 0: write as soon as a writer is free (under load, what waits meanwhile still shares a flush).")
    flush_batches: int = Field(
        500, ge=1, le=10_000, description="The most batches in one flush. Every buffered batch is unacknowledged "
        "until written, so the replica's MQTT Receive Maximum is 2 x this + 2 x ingest_workers: one flush fills "
        "while the one before is written.")
    flush_bytes: int = Field(
        32 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024, description="The most bytes one flush holds: its "
        "records as stored (UTF-8 JSON lines, before gzip) plus 1 KiB a batch for its index entry and bookkeeping, "
        "with one batch over (a batch is at most max_batch_bytes inflated, checked before it is expanded). A replica "
        "holds one flush filling and at most ingest_workers being written; a batch that does not fit waits. Not "
        "counted: payloads the broker sent that wait for a decoder (at most the Receive Maximum x the broker's "
        "max_packet_size).")


class TelemetryStoreSettings(StoreSettings):
    """Where cloud_ingest writes the fleet's telemetry, and the console and the audit read it."""

    telemetry_bucket: str = Field(
        "edgefleet-telemetry", min_length=3, max_length=63, description="Where telemetry is written.")


class IngestSettings(TelemetryStoreSettings):
    share_group: str = Field("ingest", description="The MQTT v5 shared-subscription group replicas split the load in.")
    ingest: IngestGroupSettings = Field(default_factory=IngestGroupSettings, description="Ingest workers.")
    max_batch_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, description=
        "A batch inflates to at most this many bytes; a larger one is dead-lettered unread.")


class ConsoleGroupSettings(Group):
    host: str = Field(
        "127.0.0.1", description="The address the console's web page listens on (0.0.0.0 in a container).")
    port: int = Field(8080, ge=0, le=65535, description="The console's HTTP port; 0: a free port, printed at start.")
    stale_after_s: float = Field(
        20.0, gt=0, description="A device whose newest retained status is older than this shows as stale (statuses are "
        "refreshed every status_interval_s, 5 s by default).")
    telemetry_refresh_s: float = Field(
        15.0, gt=0, description="How often the drift and latency charts are read again from the S3 telemetry.")
    telemetry_window_s: float = Field(
        3600.0, gt=0, description="How far back the charts reach.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="Host names the page answers to besides localhost, 127.0.0.1, [::1] and `host`, "
        "comma-separated (a proxy's name); any other Host header gets 421, so a DNS-rebinding page cannot "
        "read the console.")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _allowed_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [h.strip() for h in value.split(",") if h.strip()]
        for host in value:
            if not isinstance(host, str) or not host or any(c in host for c in "/ @"):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
            if ":" in host and not (host.startswith("[") and host.endswith("]")):  # only an IPv6 address, bracketed
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
        return [h.lower() for h in value]


class ConsoleSettings(TelemetryStoreSettings):
    """`edgefleet console`: the fleet console. mqtt is the FLEET broker (with the console's own client
    certificate, common name `console`); s3 is where cloud_ingest writes telemetry."""

    console: ConsoleGroupSettings = Field(default_factory=ConsoleGroupSettings, description="The web page.")


def load(cls: type[S], config_file: Path | str | None = None, **overrides: Any) -> S:
    """Builds a service's settings from every place they may come from, the later winning:
    defaults < the TOML file < secret files < the EDGEFLEET_* environment < `overrides`.

    Args:
        cls: the settings class (InferenceSettings, SyncSettings ...).
        config_file: a TOML file of keys, flat (canary_window = 20) or grouped ([canary] window = 20);
            None: the file EDGEFLEET_CONFIG_FILE names, if any.
        overrides: keys by their flat names (canary_window=20) or by group (canary={"window": 20}).

    Returns:
        The validated settings.

    Raises:
        ConfigError: a missing or broken file, a missing secrets folder, an unknown key or a bad value,
            with the key named as the user wrote it (EDGEFLEET_CANARY_WINDOW or 'canary_window' in FILE).
    """
    path = _config_file(config_file)
    layers = [_toml_values(path), _secret_values(cls, _secrets_dir()), EnvSettingsSource(cls)(), overrides]
    try:
        return cls(**_merged(*(regroup(cls, layer) for layer in layers)))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, path)) from None


def _config_file(given: Path | str | None) -> Path | None:
    named = given or os.environ.get(CONFIG_FILE_ENV) or None
    if named is not None and not Path(named).is_file():
        raise ConfigError(f"config file {str(named)!r} ({CONFIG_FILE_ENV}) does not exist")
    return None if named is None else Path(named)


def _secrets_dir() -> Path | None:
    # Secrets (passwords, S3 keys) may come as files, one per key, from EDGEFLEET_SECRETS_DIR (docker
    # compose and Kubernetes mount them under /run/secrets): the environment wins over them.
    named = os.environ.get(SECRETS_DIR_ENV) or None
    if named is not None and not Path(named).is_dir():
        raise ConfigError(f"{SECRETS_DIR_ENV}={named!r} is not a folder")
    return None if named is None else Path(named)


def _toml_values(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def _secret_values(cls: type[CommonSettings], folder: Path | None) -> dict[str, str]:
    """The keys given as files named like their variable (edgefleet_mqtt_password, any case).
    pydantic-settings' own secrets source looks only for top-level names, not a group's keys."""
    if folder is None:
        return {}
    files = {f.name.lower(): f for f in folder.iterdir() if f.is_file()}
    wanted = {f"{ENV_PREFIX}{name}".lower(): name for name in keys(cls)}
    return {wanted[name]: files[name].read_text().strip() for name in wanted.keys() & files.keys()}


def regroup(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every flat key of a group (canary_window) moved into its group (canary: window)."""
    grouped: dict[str, Any] = {}
    for key, value in values.items():
        group, inner = _split_key(cls, key)
        if inner is not None:
            grouped.setdefault(group, {})[inner] = value
        elif _group_of(cls, key) is not None and isinstance(value, dict | Group):
            # a group given whole, merged with any of its keys given flat (those win, whatever the order)
            whole = value.model_dump(exclude_unset=True) if isinstance(value, Group) else value
            grouped[key] = {**whole, **grouped.get(key, {})}
        else:
            grouped[key] = value
    return grouped


def _split_key(cls: type[BaseModel], key: str) -> tuple[str, str | None]:
    """('canary', 'window') for canary_window; (key, None) for a key of no group."""
    for name in cls.model_fields:
        group = _group_of(cls, name)
        if group is not None and key.startswith(f"{name}_") and key[len(name) + 1:] in group.model_fields:
            return name, key[len(name) + 1:]
    return key, None


def _group_of(cls: type[BaseModel], name: str) -> type[Group] | None:
    field = cls.model_fields.get(name)
    kind = field.annotation if field is not None else None
    return kind if isinstance(kind, type) and issubclass(kind, Group) else None


def _merged(*layers: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            both_groups = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both_groups else value
    return merged


def keys(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    """Every key of a settings class by its flat name (canary_window), groups opened."""
    flat: dict[str, FieldInfo] = {}
    for name, field in cls.model_fields.items():
        group = _group_of(cls, name)
        if group is None:
            flat[name] = field
        else:
            flat.update({f"{name}_{key}": inner for key, inner in group.model_fields.items()})
    return flat


def describe_errors(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        # A location is the key, its group first, then positions inside a value (providers, 0): only
        # the words name the key.
        key = "_".join(part for part in err["loc"][:2] if isinstance(part, str)) or "<config>"
        where = f"{ENV_PREFIX}{key.upper()}" + (f" or '{key}' in {path}" if path else "")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r} ({where})")
        else:
            lines.append(f"bad config key {key!r} ({where}): {err['msg']}; got {err.get('input')!r}")
    return "config error: " + "; ".join(lines)


def describe_keys(cls: type[CommonSettings]) -> str:
    """Every key with its environment variable, default and meaning: the text of `--help`."""
    rows = []
    for name, field in keys(cls).items():
        default = field.get_default(call_default_factory=True)
        default = default.value if isinstance(default, Enum) else default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        rows.append(f"{ENV_PREFIX}{name.upper()} (default {default}): {field.description}")
    rows.append(f"{CONFIG_FILE_ENV}: a TOML file with the same keys in lower case; the environment wins.")
    return "\n\n".join(rows)


def environment(settings: BaseModel) -> dict[str, str]:
    """The EDGEFLEET_* variables that give a child process these settings: the one way a service is
    started with typed settings (the launchers, the simulator and the tests spawn through it).

    Args:
        settings: any settings object of this module, validated; only the keys that were set (given,
            read from the environment, a file or a secret) are written, so the child keeps its own
            defaults for the rest.

    Returns:
        Variable name to value: secrets in clear (the child's environment is as private as a secret
        file), lists comma-joined, booleans as true/false, nested groups flattened to their own names
        (drift.psi_raise gives EDGEFLEET_DRIFT_PSI_RAISE).
    """
    given = flat_values(settings, only_set=True)
    return {f"{ENV_PREFIX}{name.upper()}": _env_text(value) for name, value in given.items() if value is not None}


def flat_values(settings: BaseModel, *, only_set: bool = False) -> dict[str, Any]:
    """Every key's value by its flat name (canary_window), groups opened; with only_set, just the
    keys that were given rather than defaulted."""
    return dict(_flat_items(settings, "", only_set))


def _flat_items(model: BaseModel, prefix: str, only_set: bool) -> Iterator[tuple[str, Any]]:
    for name in model.model_fields_set if only_set else type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Group):
            yield from _flat_items(value, f"{prefix}{name}_", only_set)
        else:
            yield f"{prefix}{name}", value


def _env_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_env_text, value))
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)
