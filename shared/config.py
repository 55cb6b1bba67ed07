"""Typed configuration for every service: environment (EDGEFLEET_*) over an optional TOML file over
defaults. Every config key is defined here, once; a bad value fails at start naming its key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shared import topics
from shared.codec import WireFormat
from shared.schemas import MAX_LIST

ENV_PREFIX = "EDGEFLEET_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
SECRETS_DIR_ENV = f"{ENV_PREFIX}SECRETS_DIR"
DEFAULT_MODEL_DIR = Path("var/models/efficientnet-lite0")

S = TypeVar("S", bound="CommonSettings")


class ConfigError(SystemExit):
    """Raised at start for a bad config; exits the process with status 2 and a message naming the key."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883", description="The device's broker, mqtt://host:port (mqtts:// for TLS)."
    )
    device_id: str = Field("device-1", description="This device's id: the <device> level of every topic.")
    mqtt_username: str | None = Field(None, description="Broker user name, where the broker asks for one.")
    mqtt_password: SecretStr | None = Field(None, description="Broker password (prefer a mounted secret file over the environment).")
    mqtt_ca_file: Path | None = Field(None, description="With mqtts://: the CA that signed the broker's certificate (default: the system's).")
    mqtt_cert_file: Path | None = Field(None, description="With mqtts://: this client's certificate, where the broker asks for one.")
    mqtt_key_file: Path | None = Field(None, description="With mqtts://: this client's private key.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log threshold.")
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line; text: for people.")
    mqtt_reconnect_min_s: float = Field(0.5, gt=0, description="First delay before reconnecting to a lost broker.")
    mqtt_reconnect_max_s: float = Field(10.0, gt=0, description="Longest delay between reconnect attempts (backoff doubles up to it).")
    status_interval_s: float = Field(5.0, gt=0, description="How often the retained status (with counters) is refreshed.")
    health_file: Path | None = Field(
        None, description="A file the service rewrites while it is healthy (broker link up, every worker loop coming "
        "round), with its pid: what `edgefleet health FILE` (the images' HEALTHCHECK, the k3s probes) reads. Unset: none.")
    health_interval_s: float = Field(5.0, gt=0, le=60, description="How often the service checks itself and rewrites the health file.")
    liveness_s: float = Field(
        30.0, gt=0, description="A worker loop that has not come round for this long (beyond a wait it announced, e.g. "
        "an S3 timeout) makes the service unhealthy, like a missed systemd watchdog ping.")
    hang_exit_s: float = Field(
        120.0, ge=0, description="A worker loop stuck for this long ends the process (exit 70), so the container's restart "
        "policy brings it back: Docker does not restart a container for being unhealthy. 0: never; else at least liveness_s.")

    @model_validator(mode="after")
    def _hang_after_liveness(self) -> CommonSettings:
        if self.hang_exit_s and self.hang_exit_s < self.liveness_s:
            raise ValueError(f"hang_exit_s ({self.hang_exit_s:g}) must be 0 or at least liveness_s ({self.liveness_s:g})")
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        parts.port  # raises ValueError for a port out of range or not a number
        return value

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str) -> str:
        return topics.check_id("device", value)

    @property
    def mqtt_host(self) -> str:
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port(self) -> int:
        parts = urlsplit(self.mqtt_url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def mqtt_tls(self) -> bool:
        return urlsplit(self.mqtt_url).scheme == "mqtts"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Secrets (passwords, S3 keys) may come as files, one per key, from EDGEFLEET_SECRETS_DIR
        # (docker compose and Kubernetes mount them under /run/secrets): the environment wins over them.
        return (init_settings, env_settings, file_secret_settings, TomlConfigSettingsSource(settings_cls))


ProviderList = Annotated[list[str], NoDecode]


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
        0, ge=0, description="ONNX Runtime threads per run; 0: 1 with several workers, else ONNX Runtime's default."
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
        1, ge=0, le=1, description="MQTT QoS of predictions and error reports: 1 survives a broker hiccup, 0 is cheaper."
    )
    prediction_format: WireFormat = Field(
        WireFormat.JSON, description="json (readable by any client) or msgpack; the MQTT v5 content type says which."
    )

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


class StoreSettings(CommonSettings):
    """Where the model registry lives: any S3-compatible store, reached through boto3. Credentials come
    from these keys or, when unset, from boto3's own chain (AWS_* variables, profiles, instance roles)."""

    s3_endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio:9000; unset: AWS S3.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(None, description="S3 access key id (unset: boto3's credential chain).")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key (prefer a mounted secret).")
    registry_bucket: str = Field("edgefleet-models", min_length=3, max_length=63, description="The registry's bucket.")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError("must look like http://host:port or https://host")
        return value


DEFAULT_STORE_DIR = Path("var/store")
DEFAULT_KEY_DIR = Path("var/keys")


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
    download_chunk_bytes: int = Field(1 << 20, ge=4096, description="Bytes per ranged GET while downloading.")
    download_limit_bytes_s: int = Field(
        0, ge=0, description="Bandwidth cap for model downloads on metered links, bytes/s; 0: none."
    )
    download_timeout_s: float = Field(10.0, gt=0, description="A stalled read or connection gives up after this.")
    download_retry_max_s: float = Field(30.0, gt=0, description="Longest wait between download retries (backoff).")
    switch_timeout_s: float = Field(
        120.0, gt=0, le=86400, description="How long inference may take to load and warm a model: the switch's deadline, which "
        "inference honours (a load finishing later is discarded and the switch fails)."
    )
    canary_window: int = Field(50, ge=5, description="Predictions compared on each side of a switch.")
    canary_warmup: int = Field(10, ge=0, description="A model's first predictions, left out of its canary window while it warms up.")
    canary_timeout_s: float = Field(
        600.0, gt=0, description="A canary whose window does not fill in this time is judged on what it has."
    )
    canary_min_samples: int = Field(
        20, ge=1, description="Fewer predictions than this on either side of a switch make the canary inconclusive "
        "(it never keeps a model); at most canary_window."
    )
    canary_inconclusive: Literal["rollback", "hold"] = Field(
        "rollback", description="An inconclusive canary (no traffic before its timeout): roll back, or hold the new "
        "model and report it as not passed."
    )
    canary_max_psi: float = Field(0.5, gt=0, description="Roll back when the predicted-class PSI (new vs old) exceeds this.")
    canary_max_error_rate: float = Field(0.05, ge=0, le=1, description="Roll back when the new model's error rate exceeds the old one's by more than this.")
    canary_max_latency_ratio: float = Field(1.5, gt=0, description="Roll back when p95 latency grows by more than this factor.")
    canary_max_confidence_drop: float = Field(0.2, ge=0, le=1, description="Roll back when mean top-1 confidence falls by more than this.")

    @field_validator("groups", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [g.strip() for g in value.split(",") if g.strip()]
        return [topics.check_id("group", g) for g in value]

    @model_validator(mode="after")
    def _canary_min_fits_window(self) -> SyncSettings:
        if self.canary_min_samples > self.canary_window:
            raise ValueError(f"canary_min_samples ({self.canary_min_samples}) exceeds canary_window ({self.canary_window})")
        return self


class TelemetrySettings(CommonSettings):
    cloud_mqtt_url: str = Field("mqtt://127.0.0.1:1884", description="The cloud broker the outbox forwards to.")
    cloud_mqtt_username: str | None = Field(None, description="User name on the cloud broker.")
    cloud_mqtt_password: SecretStr | None = Field(None, description="Password on the cloud broker.")
    outbox_path: Path = Field(Path("var/telemetry/outbox.db"), description="The durable outbox (SQLite).")
    outbox_max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024, description="The outbox's byte cap.")
    outbox_full_policy: Literal["oldest", "newest"] = Field(
        "oldest", description="When the outbox is full: drop the oldest records, or refuse the newest. Both are counted and sent as gaps."
    )
    ttl_metric_s: float = Field(7 * 86400, gt=0, description="How long a resource sample may wait for the link.")
    ttl_hard_example_s: float = Field(3 * 86400, gt=0, description="How long a hard example may wait for the link.")
    ttl_alert_s: float = Field(30 * 86400, gt=0, description="How long an alert may wait for the link.")
    flush_interval_s: float = Field(0.2, gt=0, le=10, description="Records are committed to disk together at this interval.")
    batch_max_records: int = Field(500, ge=1, le=MAX_LIST, description="Most records per batch to the cloud.")
    batch_max_bytes: int = Field(256 * 1024, ge=1024, description="Most bytes per batch to the cloud (before compression).")
    ack_timeout_s: float = Field(10.0, gt=0, description="A batch the cloud has not acknowledged by then is sent again.")
    forward_retry_max_s: float = Field(30.0, gt=0, description="Longest wait between attempts while the link is down.")
    forward_max_attempts: int = Field(
        10, ge=1, description="A batch sent this many times without an acknowledgement is given up: moved to the outbox's "
        "dead-letter table and reported to the cloud as a `dead_lettered` gap, so one poison batch cannot stall the outbox.")
    resource_interval_s: float = Field(10.0, gt=0, description="How often host and container resources are sampled.")
    docker_url: str = Field(
        "", description="The Docker Engine API for per-container CPU and memory, e.g. unix:///var/run/docker.sock "
        "(empty: off). Opt-in: whoever reaches the socket controls the host, read-only mount or not.")
    docker_project: str = Field(
        "", pattern=r"^(\*|[a-z0-9][a-z0-9_-]*)?$",
        description="Report only containers labelled com.docker.compose.project=<this> (empty: the project of the "
        "container telemetry runs in, or every container where it runs in none; *: every container).")
    drift_baseline: int = Field(200, ge=10, description="Predictions after a model starts serving that form its baseline.")
    drift_window: int = Field(100, ge=10, description="Recent predictions compared with the baseline.")
    drift_min_samples: int = Field(50, ge=5, description="No drift verdict on fewer predictions than this.")
    drift_psi_raise: float = Field(0.25, gt=0, description="Predicted-class PSI that raises an alert.")
    drift_psi_clear: float = Field(0.1, gt=0, description="PSI under which the alert is resolved (hysteresis).")
    drift_confidence_raise: float = Field(0.15, gt=0, le=1, description="Drop of mean top-1 confidence that raises an alert.")
    drift_confidence_clear: float = Field(0.05, ge=0, le=1, description="Drop under which it is resolved.")
    drift_feature_z_raise: float = Field(1.5, gt=0, description="Shift of an input statistic, in baseline standard deviations, that raises an alert.")
    drift_feature_z_clear: float = Field(0.75, gt=0, description="Shift under which it is resolved.")
    drift_latency_raise: float = Field(2.0, gt=1, description="p95 inference latency, as a multiple of the baseline's, that raises an alert.")
    drift_latency_clear: float = Field(1.5, gt=1, description="Multiple under which it is resolved.")
    hard_example_confidence: float = Field(0.3, gt=0, le=1, description="Frames whose top-1 confidence is below this are hard examples.")
    hard_examples_per_minute: float = Field(6.0, ge=0, description="Most hard examples forwarded per minute (0: none).")

    @field_validator("cloud_mqtt_url")
    @classmethod
    def _cloud_url(cls, value: str) -> str:
        return CommonSettings._broker_url(value)

    @field_validator("docker_url")
    @classmethod
    def _docker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("unix", "tcp", "http", "https", "ssh") or not (parts.path or parts.netloc)):
            raise ValueError("must be empty (off) or look like unix:///var/run/docker.sock or tcp://host:2375")
        return value

    def cloud(self) -> CommonSettings:
        """The settings of the link to the cloud broker."""
        return CommonSettings(
            mqtt_url=self.cloud_mqtt_url, device_id=self.device_id, mqtt_username=self.cloud_mqtt_username,
            mqtt_ca_file=self.mqtt_ca_file, mqtt_cert_file=self.mqtt_cert_file, mqtt_key_file=self.mqtt_key_file,
            mqtt_password=self.cloud_mqtt_password, mqtt_reconnect_min_s=self.mqtt_reconnect_min_s,
            mqtt_reconnect_max_s=self.mqtt_reconnect_max_s,
        )


class IngestSettings(StoreSettings):
    telemetry_bucket: str = Field("edgefleet-telemetry", min_length=3, max_length=63, description="Where telemetry is written.")
    share_group: str = Field("ingest", description="The MQTT v5 shared-subscription group replicas split the load in.")
    ingest_workers: int = Field(4, ge=1, le=64, description="Batches written to S3 at once.")
    max_batch_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, description="A batch inflates to at most this many bytes; a larger one is dead-lettered unread.")
    ingest_session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps a replica's session (and the batches it took but did not "
        "acknowledge) after the replica is gone; a replica restarted with the same id gets them again.")


def load(cls: type[S], config_file: Path | str | None = None, **overrides: Any) -> S:
    """Builds the settings, raising ConfigError with the offending key named."""
    path = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} ({CONFIG_FILE_ENV}) does not exist")
        try:
            tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    secrets = os.environ.get(SECRETS_DIR_ENV) or None
    if secrets is not None and not Path(secrets).is_dir():
        raise ConfigError(f"{SECRETS_DIR_ENV}={secrets!r} is not a folder")
    bound = type(cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": path, "secrets_dir": secrets}})
    try:
        return bound(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, path)) from None


def describe_errors(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else "<config>"
        where = f"{ENV_PREFIX}{key.upper()}" + (f" or '{key}' in {path}" if path else "")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r} ({where})")
        else:
            lines.append(f"bad config key {key!r} ({where}): {err['msg']}; got {err.get('input')!r}")
    return "config error: " + "; ".join(lines)


def describe_keys(cls: type[CommonSettings]) -> str:
    """Every key with its environment variable, default and meaning: the text of `--help`."""
    rows = []
    for name, field in cls.model_fields.items():
        default = field.default.value if hasattr(field.default, "value") else field.default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        rows.append(f"{ENV_PREFIX}{name.upper()} (default {default}): {field.description}")
    rows.append(f"{CONFIG_FILE_ENV}: a TOML file with the same keys in lower case; the environment wins.")
    return "\n\n".join(rows)
