"""`edgefleet <command>`: the services (`inference`, ...), and the tools beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shared.config import (
    DEFAULT_KEY_DIR,
    DEFAULT_MODEL_DIR,
    CameraSettings,
    CommonSettings,
    ConfigError,
    InferenceSettings,
    IngestSettings,
    StoreSettings,
    SyncSettings,
    TelemetrySettings,
    describe_keys,
    load,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Build and manage models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each prints a table and writes JSON with its goals.")
app.add_typer(model_app, name="model")
keys_app = typer.Typer(no_args_is_help=True, help="Operator signing keys.")
broker_app = typer.Typer(no_args_is_help=True, help="Files for the Mosquitto brokers: passwords, the bridge to the fleet.")
app.add_typer(broker_app, name="broker")
certs_app = typer.Typer(no_args_is_help=True, help="A development CA and certificates for the fleet broker and its bridges.")
app.add_typer(certs_app, name="certs")
rollout_app = typer.Typer(no_args_is_help=True, help="Roll models out to the fleet: canary, promote, abort, status.")
app.add_typer(rollout_app, name="rollout")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")

# Every bench writes its table and goals as JSON here (edgefleet/bench/report.py).
BenchJson = Annotated[Optional[Path], typer.Option("--json", help="Write the results here.")]
ConfigFile = Annotated[
    Optional[Path], typer.Option("--config", help="A TOML file of config keys; the environment wins over it.")
]


def _settings(cls, config: Path | None, **overrides):
    try:
        return load(cls, config, **{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        typer.echo(f"edgefleet: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command(epilog=describe_keys(InferenceSettings))
def inference(config: ConfigFile = None) -> None:
    """Run the inference service: frames in, predictions out. Configured by these keys:"""
    from services.inference.service import main

    raise typer.Exit(main(_settings(InferenceSettings, config)))


@app.command(epilog=describe_keys(SyncSettings))
def sync(config: ConfigFile = None) -> None:
    """Run the sync service: rollouts in, verified models installed, canaries judged. Configured by these keys:"""
    from services.sync.service import main

    raise typer.Exit(main(_settings(SyncSettings, config)))


telemetry_app = typer.Typer(help="The telemetry service (with no sub-command), and the completeness audit.",
                            invoke_without_command=True, epilog=describe_keys(TelemetrySettings))
app.add_typer(telemetry_app, name="telemetry")


@telemetry_app.callback()
def telemetry(ctx: typer.Context, config: ConfigFile = None) -> None:
    """Run the telemetry service: drift alerts, resources, hard examples, store-and-forward to the cloud."""
    if ctx.invoked_subcommand is not None:
        return
    from services.telemetry.service import main

    raise typer.Exit(main(_settings(TelemetrySettings, config)))


@telemetry_app.command("audit")
def telemetry_audit(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per device instead of a table.")] = False,
    config: ConfigFile = None,
) -> None:
    """Per device: records in S3, the highest sequence number, what the device declared lost, what is missing."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from edgefleet.audit import audit
    from shared import s3

    settings = _settings(IngestSettings, config)
    report = audit(s3.client(settings), settings.telemetry_bucket)
    if json_out:
        for device in sorted(report):
            typer.echo(json.dumps({**asdict(report[device]), "missing_count": report[device].missing_count}))
        return
    table = Table(title=f"edgefleet telemetry audit · s3://{settings.telemetry_bucket}")
    for column in ("device", "epochs", "received", "highest seq", "declared lost", "missing (unexplained)", "duplicates"):
        table.add_column(column)
    for device, r in sorted(report.items()):
        lost = ", ".join(f"{reason} {n}" for reason, n in r.declared_lost.items()) or "none"
        missing = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in r.missing[:5]) or "none"
        epochs = ", ".join(f"{e.epoch} ({e.received})" for e in r.epochs.values())
        table.add_row(device, epochs, str(r.received), str(r.highest_seq), lost, missing, str(r.duplicates))
    Console().print(table)


@app.command("cloud-ingest", epilog=describe_keys(IngestSettings))
def cloud_ingest(config: ConfigFile = None) -> None:
    """Run a cloud_ingest replica: telemetry batches from the cloud broker into S3. Configured by these keys:"""
    from services.cloud_ingest.service import main

    raise typer.Exit(main(_settings(IngestSettings, config)))


@app.command()
def health(
    file: Annotated[Path, typer.Argument(help="The service's EDGEFLEET_HEALTH_FILE.")],
    max_age: Annotated[float, typer.Option(min=1, help="Seconds since the last healthy check before it counts as unhealthy.")] = 15.0,
    kill_after: Annotated[Optional[float], typer.Option(
        min=0, help="Also SIGKILL the service when its heartbeat has been silent for max-age + this many seconds "
        "(a frozen process), so its container exits and its restart policy brings it back. For containers run "
        "with an init (compose `init: true`): the service must not be PID 1.")] = None,
) -> None:
    """Exit 0 when the service was healthy within max-age (broker link up, every worker loop coming round):
    the containers' health check. Prints why not."""
    from shared.health import check_health

    ok, why = check_health(file, max_age, kill_after)
    typer.echo(why, err=not ok)
    raise typer.Exit(0 if ok else 1)


@app.command(epilog=describe_keys(CameraSettings))
def camera(
    config: ConfigFile = None,
    cameras: Annotated[Optional[str], typer.Option(help="Camera ids, comma-separated.")] = None,
    rate: Annotated[Optional[float], typer.Option(help="Frames per second per camera.")] = None,
    source: Annotated[Optional[str], typer.Option(help="bundled, a folder, an image, a video file or a device number.")] = None,
    envelope: Annotated[Optional[bool], typer.Option("--envelope/--raw", help="msgpack envelopes or raw bytes.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Frames per camera, then stop (0: run on).")] = None,
) -> None:
    """Simulate cameras: publish real images at a fixed rate. Keys (flags override them):"""
    from edgefleet import camera as simulator
    from shared import logs

    settings = _settings(CameraSettings, config, cameras=cameras, rate_hz=rate, source=source, envelope=envelope, count=count)
    logs.setup("camera", settings.device_id, settings.log_level, settings.log_format)
    try:
        raise typer.Exit(simulator.main(settings))
    except ValueError as exc:
        typer.echo(f"edgefleet camera: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def up(
    cameras: Annotated[int, typer.Option(min=1, max=64, help="Simulated cameras.")] = 3,
    rate: Annotated[float, typer.Option(min=0.1, help="Frames per second per camera.")] = 2.0,
    device_id: Annotated[str, typer.Option(help="The device id.")] = "device-1",
    mqtt_url: Annotated[Optional[str], typer.Option(help="Use this broker instead of spawning one.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """The whole edge stack locally: broker, inference, cameras, and live predictions. Ctrl-C stops."""
    from edgefleet import stack

    _settings(CommonSettings, None, device_id=device_id, mqtt_url=mqtt_url)  # fail fast on bad values
    raise typer.Exit(stack.run(cameras, rate, device_id, mqtt_url, duration))


@app.command()
def fleet(
    devices: Annotated[int, typer.Option(min=1, max=8, help="Simulated devices.")] = 2,
    rate: Annotated[float, typer.Option(min=0.1, help="Frames per second per camera (two cameras a device).")] = 2.0,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    folder: Annotated[Path, typer.Option(help="The fleet's certificates, model stores, outboxes and logs.")] = Path("var/fleet"),
) -> None:
    """The whole fleet locally: fleet broker (TLS), S3 store, cloud_ingest, and devices each with broker, sync, inference, telemetry and cameras."""
    from edgefleet import fleet as local_fleet

    raise typer.Exit(local_fleet.run(devices, rate, duration, folder))


@model_app.command("build")
def model_build(
    out: Annotated[Path, typer.Option(help="Where model.onnx and manifest.json go.")] = DEFAULT_MODEL_DIR,
    force: Annotated[bool, typer.Option(help="Rebuild even if a verified model is there.")] = False,
) -> None:
    """Export EfficientNet-Lite0 (real ImageNet weights) to ONNX with a manifest; cached once built."""
    from edgefleet.models.build import build
    from shared.manifest import ModelError

    try:
        manifest, built = build(out, force)
    except ModelError as exc:
        typer.echo(f"edgefleet model build: {exc}", err=True)
        raise typer.Exit(1) from None
    verb = "built" if built else "cached"
    typer.echo(f"{verb} {manifest.name} v{manifest.version} sha256 {manifest.sha256[:16]}… in {out}", err=True)


DATA_DIR = Path("var/data")


def _training(epochs: int, batch: int, learning_rate: float, temperature: float, alpha: float):
    from edgefleet.models.distill import Training

    return Training(epochs=epochs, batch=batch, learning_rate=learning_rate, temperature=temperature, alpha=alpha)


Epochs = Annotated[int, typer.Option(min=1, help="Passes over the frames.")]
Batch = Annotated[int, typer.Option(min=1, help="Frames per training step.")]
LearningRate = Annotated[float, typer.Option(min=0, help="Adam's learning rate.")]
Temperature = Annotated[float, typer.Option(min=0.1, help="Softens teacher and student outputs.")]
Alpha = Annotated[float, typer.Option(min=0, max=1, help="Weight of the teacher's soft labels (the rest: true labels, where a frame has one).")]
Gate = Annotated[float, typer.Option(min=0, max=1, help="Least top-1 agreement with the parent to pass.")]
Frames = Annotated[Path, typer.Option(help="Training frames; a sub-folder named after a label gives its frames that true label.")]
EvalDir = Annotated[Path, typer.Option("--eval", help="Held-out images for the quality gate.")]


def _fail(command: str, exc: Exception) -> typer.Exit:
    typer.echo(f"edgefleet model {command}: {exc}", err=True)
    return typer.Exit(1)


def _gate_line(manifest) -> str:
    q = manifest.quality
    return (f"top-1 agreement with the parent {q.value:.1%} on {q.samples} held-out images "
            f"(gate {q.threshold:.0%}: {'passed' if q.passed else 'FAILED, not publishable'})")


@model_app.command("dataset")
def model_dataset(
    out: Annotated[Path, typer.Option(help="Where eval/ and calibration/ go.")] = DATA_DIR,
    eval_count: Annotated[int, typer.Option(min=1, help="Held-out evaluation images.")] = 300,
    calibration_count: Annotated[int, typer.Option(min=1, help="Calibration images.")] = 128,
) -> None:
    """Make the evaluation and calibration images from real photos (fixed seeds, disjoint sets)."""
    from edgefleet.models import dataset

    index = dataset.make(out, eval_count, calibration_count)
    counts = {split: len(v["images"]) for split, v in index["splits"].items()}
    typer.echo(f"wrote {counts} images to {out}", err=True)


@model_app.command("quantize")
def model_quantize(
    mode: Annotated[str, typer.Option(help="static (QDQ, per-channel, calibrated) or dynamic.")] = "static",
    parent: Annotated[Path, typer.Option(help="The float model's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Optional[Path], typer.Option(help="Where the INT8 model goes (default: beside the parent).")] = None,
    calibration: Annotated[Path, typer.Option(help="Real frames to calibrate on (e.g. the fleet's hard examples).")] = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    method: Annotated[str, typer.Option(help="minmax, entropy or percentile.")] = "minmax",
    weight_type: Annotated[str, typer.Option(help="qint8 or quint8.")] = "qint8",
    gate: Gate = 0.97,
    max_float_layers: Annotated[int, typer.Option(min=0, help="Mixed precision: most layers kept in float, worst first, until the gate holds (0: none).")] = 24,
) -> None:
    """INT8 with onnxruntime.quantization; writes model.onnx and a manifest with recipe and quality gate."""
    from edgefleet.models.quantize import Method, Mode, WeightType, derived_name, quantize
    from shared.manifest import ModelError

    try:
        chosen = Mode(mode), Method(method), WeightType(weight_type)
    except ValueError as exc:
        typer.echo(f"edgefleet model quantize: {exc}", err=True)
        raise typer.Exit(2) from None
    target = out or parent.with_name(derived_name(parent.name, chosen[0], chosen[1]))
    try:
        manifest, report = quantize(
            parent, target, chosen[0], eval_dir, calibration, chosen[1], chosen[2], gate, max_float_layers
        )
    except (ModelError, FileNotFoundError, ValueError) as exc:
        raise _fail("quantize", exc) from None
    typer.echo(
        f"{manifest.name}: {manifest.size_bytes / 1e6:.1f} MB, {_gate_line(manifest)}; "
        f"left in float: {report.left_in_float()}; {report.seconds:.0f} s -> {target}",
        err=True,
    )
    for name, shift, agreement in report.float_layers:
        typer.echo(f"  kept in float: {name} (output shift KL {shift:.4f} when quantized alone; "
                   f"calibration agreement {agreement:.1%} with it in float)", err=True)


@model_app.command("prune")
def model_prune(
    parent: Annotated[Path, typer.Option(help="The float model's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Optional[Path], typer.Option(help="Where the pruned model goes (default: beside the parent).")] = None,
    ratio: Annotated[float, typer.Option(min=0.01, max=0.95, help="Share of channels (structured) or weights (unstructured) removed.")] = 0.2,
    unstructured: Annotated[bool, typer.Option(help="Zero single weights instead of removing channels (no speed-up; for comparison).")] = False,
    frames: Frames = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads for the latency figures.")] = 1,
    epochs: Epochs = 3, batch: Batch = 16, learning_rate: LearningRate = 1e-4,
    temperature: Temperature = 4.0, alpha: Alpha = 0.9, gate: Gate = 0.97,
) -> None:
    """Structured channel pruning (torch-pruning), fine-tuned on the parent's outputs, exported smaller."""
    from edgefleet.models.prune import prune
    from shared.manifest import ModelError

    kind = "unstructured" if unstructured else "structured"
    target = out or parent.with_name(f"{parent.name}-pruned-{kind}-{round(ratio * 100)}")
    try:
        manifest, report = prune(parent, target, frames, eval_dir, ratio, not unstructured,
                                 _training(epochs, batch, learning_rate, temperature, alpha), gate, threads)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        raise _fail("prune", exc) from None
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest.name}: {kind} pruning, {ratio:.0%}")
    for column in ("", "parameters", "zero weights", "MMACs / image", "file MB", f"p50 ms, batch 1, {threads} thread(s)"):
        table.add_column(column, justify="right")
    for label, f in (("before", report.before), ("after", report.after)):
        table.add_row(label, f"{f.cost.parameters:,}", f"{f.cost.zero_parameters:,}", f"{f.cost.macs / 1e6:.0f}",
                      f"{f.size_bytes / 1e6:.2f}", f"{f.p50_ms:.2f}")
    console = Console(stderr=True)
    console.print(table)
    if report.note:
        console.print(f"[yellow]NOTE: {report.note}[/]")
    typer.echo(f"{manifest.name}: {_gate_line(manifest)}; fine-tune {report.fit.steps} steps, loss "
               f"{report.fit.first_loss:.3f} -> {report.fit.last_loss:.3f} -> {target}", err=True)


@model_app.command("distill")
def model_distill(
    parent: Annotated[Path, typer.Option("--teacher", help="The float teacher's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Optional[Path], typer.Option(help="Where the student goes (default: beside the teacher).")] = None,
    drop_blocks: Annotated[int, typer.Option(min=1, max=9, help="Residual blocks the student goes without.")] = 5,
    frames: Frames = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    epochs: Epochs = 3, batch: Batch = 16, learning_rate: LearningRate = 1e-4,
    temperature: Temperature = 4.0, alpha: Alpha = 0.9, gate: Gate = 0.97,
) -> None:
    """Trains a smaller student on the teacher's soft labels (and true labels where there are any)."""
    from edgefleet.models.distill import distill
    from shared.manifest import ModelError

    target = out or parent.with_name(f"{parent.name}-distilled-{16 - drop_blocks}blocks")
    try:
        manifest, report = distill(parent, target, frames, eval_dir, drop_blocks,
                                   _training(epochs, batch, learning_rate, temperature, alpha), gate)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        raise _fail("distill", exc) from None
    typer.echo(
        f"{manifest.name}: without blocks {report.dropped_blocks}; parameters {report.before.parameters:,} -> "
        f"{report.after.parameters:,}, MMACs {report.before.macs / 1e6:.0f} -> {report.after.macs / 1e6:.0f}; "
        f"{report.fit.frames} frames ({report.fit.labelled_frames} labelled), loss {report.fit.first_loss:.3f} -> "
        f"{report.fit.last_loss:.3f}; {_gate_line(manifest)} -> {target}", err=True,
    )


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(help="Folder for <name>.key (private, mode 600) and <name>.pub.")] = DEFAULT_KEY_DIR,
    name: Annotated[str, typer.Option(help="File name stem.")] = "operator",
) -> None:
    """Make an Ed25519 signing key; devices trust its .pub half (EDGEFLEET_TRUSTED_KEYS_DIR)."""
    from shared.registry import new_key_pair

    try:
        pair = new_key_pair(out, name)
    except FileExistsError as exc:
        typer.echo(f"edgefleet keys new: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"key {pair.key_id}: private {pair.private}, public {pair.public}", err=True)


s3_app = typer.Typer(no_args_is_help=True, help="Least privilege in the S3 store: a read-only models/* key per device.")
app.add_typer(s3_app, name="s3")


@s3_app.command("device-key", epilog=describe_keys(StoreSettings))
def s3_device_key(
    device: Annotated[str, typer.Argument(help="The device id: its IAM user is edgefleet-device-<DEVICE>.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for access-key and secret-key (default: var/s3/<DEVICE>).")] = None,
    config: ConfigFile = None,
) -> None:
    """With the store's admin keys (these EDGEFLEET_S3_* keys), through its IAM API (AWS, moto): a user and a key
    that can only read models/* of the registry. Keeps a key already in --out that still works; a new key
    replaces the user's others. MinIO has no IAM API: see README for its `mc admin` commands. Keys:"""
    from edgefleet.s3access import DEFAULT_KEYS_DIR, DeviceKeyError, issue

    settings = _settings(StoreSettings, config)
    try:
        done = issue(settings, device, out or DEFAULT_KEYS_DIR / device)
    except DeviceKeyError as exc:
        typer.echo(f"edgefleet s3 device-key: {exc}", err=True)
        raise typer.Exit(1) from None
    if not done.created:
        typer.echo(f"kept: the key {done.access_key_id} of {done.user} in {done.folder} still works", err=True)
        return
    revoked = f"; revoked its older keys {', '.join(done.revoked)}" if done.revoked else ""
    typer.echo(f"created key {done.access_key_id} for {done.user} (read models/* only) in {done.folder}{revoked}", err=True)


@s3_app.command("policy")
def s3_policy(
    bucket: Annotated[Optional[str], typer.Option(help="The registry bucket (default: EDGEFLEET_REGISTRY_BUCKET).")] = None,
    config: ConfigFile = None,
) -> None:
    """Print the device policy for a registry bucket (deploy/s3/device-policy.json is the default's), for `mc admin policy create`."""
    import json

    from edgefleet.s3access import device_policy

    typer.echo(json.dumps(device_policy(bucket or _settings(StoreSettings, config).registry_bucket), indent=2))


CertDir = Annotated[Path, typer.Option("--out", help="The folder of ca.crt/ca.key and the certificates.")]
SERVICE_USERS = ("inference", "sync", "telemetry", "console")


@broker_app.command("passwords")
def broker_passwords(
    out: Annotated[Path, typer.Option(help="The Mosquitto password file; <user>.password files go beside it.")] = Path("var/broker/passwords"),
    cameras: Annotated[str, typer.Option(help="Camera ids, comma-separated: each gets its own user.")] = "cam-1",
) -> None:
    """A user and a random password per service and per camera, hashed by mosquitto_passwd (deploy/mosquitto/edge.acl names them)."""
    import secrets

    from edgefleet.brokerconf import password_file

    users = {u: secrets.token_urlsafe(18) for u in (*SERVICE_USERS, *(c.strip() for c in cameras.split(",") if c.strip()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    password_file(out, users)
    for user, password in users.items():
        (out.parent / f"{user}.password").touch(mode=0o600)
        (out.parent / f"{user}.password").write_text(password)
    typer.echo(f"{len(users)} users in {out}; their passwords in {out.parent}/<user>.password", err=True)


@broker_app.command("bridge")
def broker_bridge(
    device: Annotated[str, typer.Argument(help="The device id (its certificate's common name).")],
    host: Annotated[str, typer.Option(help="The fleet broker's host.")] = "cloud-broker",
    port: Annotated[int, typer.Option(help="The fleet broker's TLS port.")] = 8883,
    certs: Annotated[Path, typer.Option(help="Where the broker finds ca.crt, <device>.crt and <device>.key.")] = Path("/mosquitto/certs"),
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """The device broker's bridge to the fleet broker: TLS with the device's certificate, a persistent session."""
    from edgefleet.brokerconf import bridge

    text = bridge(device, host, port, certs)
    if out is None:
        typer.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


@certs_app.command("ca")
def certs_ca(out: CertDir = Path("var/certs")) -> None:
    """A new certificate authority for development fleets (ca.crt, ca.key, and its empty revocation list
    ca.crl, which the fleet broker requires). On an existing CA without ca.crl, writes only that."""
    from edgefleet.certs import CRL, new_ca, write_crl

    if (out / "ca.key").exists():
        if not (out / CRL).exists():  # a CA made before the fleet broker checked revocations (crlfile)
            typer.echo(f"revocation list written to {write_crl(out, {})}", err=True)
            return
        typer.echo(f"edgefleet certs ca: {out / 'ca.key'} exists; a CA is never overwritten", err=True)
        raise typer.Exit(1)
    new_ca(out)
    typer.echo(f"CA written to {out}", err=True)


@certs_app.command("issue")
def certs_issue(
    names: Annotated[list[str], typer.Argument(help="Common names: device ids; with --service operator or cloud-ingest-<n>; with --server the broker's name.")],
    server: Annotated[bool, typer.Option(help="A server certificate (the cloud broker's) instead of a client one.")] = False,
    service: Annotated[bool, typer.Option(help="A fleet service's client certificate: operator, or cloud-ingest-<n> per replica.")] = False,
    hosts: Annotated[str, typer.Option(help="With --server: host names and addresses, comma-separated.")] = "localhost,127.0.0.1",
    out: CertDir = Path("var/certs"),
) -> None:
    """Certificates signed by the CA: a device's common name is its id, which the cloud broker's ACL confines.
    The fleet's own names (operator, cloud-ingest*, cloud-broker, _fleet) are never issued to a device."""
    from edgefleet.certs import issue, issue_device, issue_service

    for name in names:
        try:
            if server:
                path = issue(out, name, True, tuple(h.strip() for h in hosts.split(",") if h.strip()))
            else:
                path = (issue_service if service else issue_device)(out, name)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"edgefleet certs issue: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"issued {path}", err=True)


@certs_app.command("revoke")
def certs_revoke(
    names: Annotated[list[str], typer.Argument(help="Common names whose certificate (<name>.crt in --out) is revoked.")],
    out: CertDir = Path("var/certs"),
) -> None:
    """Adds the certificates to the CA's revocation list (ca.crl beside ca.crt). The fleet broker reads it
    at start and on SIGHUP: reload or restart it to refuse them."""
    from edgefleet.certs import revoke

    for name in names:
        try:
            serial = revoke(out, name)
        except FileNotFoundError as exc:
            typer.echo(f"edgefleet certs revoke: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"revoked {name} (serial {serial:x}) in {out / 'ca.crl'}; reload (SIGHUP) or restart the fleet broker to apply", err=True)


@model_app.command("publish", epilog=describe_keys(StoreSettings))
def model_publish(
    model: Annotated[Path, typer.Argument(help="The model's folder (model.onnx and manifest.json).")],
    key: Annotated[Path, typer.Option(help="The operator's Ed25519 private key.")] = DEFAULT_KEY_DIR / "operator.key",
    name: Annotated[Optional[str], typer.Option(help="Publish under this name (default: the manifest's).")] = None,
    version: Annotated[Optional[int], typer.Option(min=1, max=10**9, help="Version number (default: one past every version in the registry).")] = None,
    config: ConfigFile = None,
) -> None:
    """Sign and upload a model to the S3 registry. Refuses gate-failed models and stale versions. Keys:"""
    from edgefleet.registry import PublishRefused, publish
    from shared import s3
    from shared.manifest import ModelError

    settings = _settings(StoreSettings, config)
    try:
        done = publish(s3.client(settings), settings.registry_bucket, model, key, name, version)
    except (PublishRefused, ModelError, ValueError, FileNotFoundError) as exc:  # ValueError: bad name, key
        typer.echo(f"edgefleet model publish: refused: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"published {done.name} v{done.version} (sha256 {done.sha256[:16]}…, signed by key {done.key_id}) "
               f"at s3://{settings.registry_bucket}/{done.prefix}", err=True)


@model_app.command("evaluate")
def model_evaluate(
    models: Annotated[list[Path], typer.Argument(help="Model folders to compare.")],
    teacher: Annotated[Path, typer.Option(help="The float model agreement is measured against.")] = DEFAULT_MODEL_DIR,
    eval_dir: Annotated[Path, typer.Option("--eval", help="Held-out images.")] = DATA_DIR / "eval",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads (0: all cores).")] = 0,
    json_out: BenchJson = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write a Markdown table here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of agreement against latency, Pareto front marked.")] = None,
) -> None:
    """Size, agreement with the float teacher, latency p50/p95/p99 and best throughput, on held-out images."""
    from edgefleet.models.evaluate import evaluate, write
    from shared.manifest import ModelError

    try:
        results = evaluate(models, teacher, eval_dir, threads)
    except (ModelError, FileNotFoundError) as exc:
        typer.echo(f"edgefleet model evaluate: {exc}", err=True)
        raise typer.Exit(1) from None
    write(results, json_out, markdown)
    if plot is not None:
        from edgefleet.models.plot import save

        save(results, plot)
        typer.echo(f"wrote {plot}", err=True)


@bench_app.command("pipeline")
def bench_pipeline(
    quick: Annotated[bool, typer.Option(help="Less data; finishes within a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model to measure.")] = DEFAULT_MODEL_DIR,
) -> None:
    """Raw ONNX Runtime against the whole MQTT path, in one run on the same model and cores."""
    from edgefleet.bench import pipeline

    raise typer.Exit(pipeline.run(quick=quick, json_out=json_out, model_dir=model_dir))


@bench_app.command("compression")
def bench_compression(
    quick: Annotated[bool, typer.Option(help="Less data; finishes within a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The float model.")] = DEFAULT_MODEL_DIR,
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads for every model (0: all cores).")] = 1,
) -> None:
    """FP32 against static and dynamic INT8, quantized and measured in one run on held-out real images."""
    from edgefleet.bench import compression

    raise typer.Exit(compression.run(quick=quick, json_out=json_out, model_dir=model_dir, threads=threads))


@bench_app.command("swap")
def bench_swap(
    quick: Annotated[bool, typer.Option(help="A shorter stream; about half a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model swapped in and out (with a rebuilt copy of itself).")] = DEFAULT_MODEL_DIR,
    rate: Annotated[float, typer.Option(min=1, help="Frames per second offered throughout.")] = 100.0,
) -> None:
    """Frames through inference while 20 hot swaps happen, against the same stream without: drops, gaps, memory."""
    from edgefleet.bench import swap

    raise typer.Exit(swap.run(quick, json_out, model_dir, rate))


@bench_app.command("overload")
def bench_overload(
    quick: Annotated[bool, typer.Option(help="A shorter overload; about half a minute.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model to serve.")] = DEFAULT_MODEL_DIR,
    factor: Annotated[float, typer.Option(min=2, help="Offered rate, as a multiple of the sustainable rate measured first.")] = 10.0,
) -> None:
    """Ten times the sustainable rate against the sustainable rate itself, in one run: latency growth, memory growth, counters."""
    from edgefleet.bench import overload

    raise typer.Exit(overload.run(quick, json_out, model_dir, factor))


@bench_app.command("telemetry")
def bench_telemetry(
    quick: Annotated[bool, typer.Option(help="Smaller volumes; about a minute.")] = False,
    json_out: BenchJson = None,
    contained: Annotated[bool, typer.Option("--containers/--no-containers", help="Also measure 1, 2 and 4 cloud_ingest "
        "containers at --cpus 0.25 each (needs a Docker engine; without one the rows say so).")] = True,
    build: Annotated[bool, typer.Option(help="Run scripts/images.sh cloud-ingest first (cached).")] = True,
) -> None:
    """Outbox writes against raw SQLite, backlog drain to S3, cloud_ingest two replicas against one, and 1/2/4 containers."""
    from edgefleet.bench import telemetry

    raise typer.Exit(telemetry.run(quick, json_out, contained, build))


@bench_app.command("images")
def bench_images(
    quick: Annotated[bool, typer.Option(help="A shorter idle before memory is read; about a minute once built.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model the inference container serves (mounted read-only).")] = DEFAULT_MODEL_DIR,
    build: Annotated[bool, typer.Option(help="Run scripts/images.sh first (cached builds; stand-ins made where missing).")] = True,
    real_base_mb: Annotated[float, typer.Option(min=1, help="Size of the real python:3.11-slim, uncompressed, in MB.")] = 130.0,
    services: Annotated[Optional[str], typer.Option(help="Only these services' start-up, comma-separated (default: all).")] = None,
) -> None:
    """Every image's size (and on the real slim base), each service container's cold start to healthy, its idle memory."""
    from edgefleet.bench import images

    only = [s.strip() for s in services.split(",") if s.strip()] if services else None
    try:
        code = images.run(quick, json_out, model_dir, build, real_base_mb, only)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--services") from None
    raise typer.Exit(code)


@bench_app.command("ep")
def bench_ep(
    quick: Annotated[bool, typer.Option(help="Fewer runs per provider.")] = False,
    json_out: BenchJson = None,
    model_dir: Annotated[Path, typer.Option(help="The model to run.")] = DEFAULT_MODEL_DIR,
    providers: Annotated[str, typer.Option(help="Providers to try, comma-separated.")] = "tensorrt,cuda,openvino,cpu",
) -> None:
    """Which execution providers this machine has, latency on each, and every fallback said out loud."""
    from edgefleet.bench import ep

    raise typer.Exit(ep.run(quick, json_out, model_dir, [p.strip() for p in providers.split(",") if p.strip()]))



def _fleet(config: Path | None, mqtt_url: str | None) -> CommonSettings:
    return _settings(CommonSettings, config, mqtt_url=mqtt_url)


FleetUrl = Annotated[Optional[str], typer.Option(help="The fleet broker (default: EDGEFLEET_MQTT_URL).")]


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="The registry's model name.")],
    version: Annotated[int, typer.Argument(min=1, help="The published version.")],
    devices: Annotated[Optional[str], typer.Option(help="Only these devices, comma-separated.")] = None,
    group: Annotated[Optional[str], typer.Option(help="Only devices in these groups, comma-separated.")] = None,
    canary: Annotated[float, typer.Option(min=0.0001, max=100, help="Percent of the target that goes first (100: all).")] = 100.0,
    allow_downgrade: Annotated[bool, typer.Option(help="An explicit rollback to an older version.")] = False,
    rollout_id: Annotated[Optional[str], typer.Option(help="Name the rollout (default: model, version and a random suffix).")] = None,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Start a rollout: all devices, a group, listed devices, or a canary share of them."""
    from edgefleet import rollout
    from shared.schemas import RolloutTarget

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else []  # noqa: E731
    target = RolloutTarget(devices=split(devices), groups=split(group), share=canary / 100)
    try:
        started = rollout.start(_fleet(config, mqtt_url), model, version, target, allow_downgrade, rollout_id)
    except (ConnectionError, ValueError) as exc:
        typer.echo(f"edgefleet rollout start: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"rollout {started.rollout_id}: {model} v{version}, {started.phase.value}, "
               f"{canary:g} % of {', '.join(target.devices or target.groups) or 'all devices'}", err=True)
    typer.echo(started.rollout_id)


def _change(phase_name: str, config: Path | None, mqtt_url: str | None) -> None:
    from edgefleet import rollout
    from shared.schemas import RolloutPhase

    try:
        changed = rollout.change_phase(_fleet(config, mqtt_url), RolloutPhase(phase_name))
    except (ConnectionError, rollout.NoRollout) as exc:
        typer.echo(f"edgefleet rollout: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"rollout {changed.rollout_id}: {phase_name}", err=True)


@rollout_app.command("promote")
def rollout_promote(mqtt_url: FleetUrl = None, config: ConfigFile = None) -> None:
    """Every device of the rollout's target installs it (after a canary)."""
    _change("promoted", config, mqtt_url)


@rollout_app.command("abort")
def rollout_abort(mqtt_url: FleetUrl = None, config: ConfigFile = None) -> None:
    """Every device that installed the rollout's model goes back to the one it had."""
    _change("aborted", config, mqtt_url)


@rollout_app.command("status")
def rollout_status(
    wait: Annotated[float, typer.Option(min=0.1, help="Seconds to collect the devices' retained states.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    mqtt_url: FleetUrl = None,
    config: ConfigFile = None,
) -> None:
    """Per device (named by its topic): state, model served, the rollout's model, the last reason, the
    report's age, and whether the device is stale (nothing heard for 3 status intervals)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from edgefleet import rollout

    rows = rollout.rows(_fleet(config, mqtt_url), wait)
    if json_out:
        for row in rows:
            typer.echo(json.dumps(row.as_json()))
        return
    table = Table(title="edgefleet rollout status")
    # A device id is never cut or wrapped (operators grep for it); other cells wrap rather than elide.
    table.add_column("device", no_wrap=True, min_width=max((len(row.device) for row in rows), default=6))
    for column in ("rollout", "state", "serving", "target", "reason", "age", "health"):
        table.add_column(column, overflow="fold")
    for row in rows:
        r = row.report
        table.add_row(row.device, (r.rollout_id or "") if r else "", r.state.value if r else "(no report)",
                      f"{r.serving.name} v{r.serving.version}" if r and r.serving else "",
                      f"{r.target.name} v{r.target.version}" if r and r.target else "", (r.reason or "") if r else "",
                      f"{row.age_s:.0f} s" if row.age_s is not None else "", _health(row))
    console = Console()
    # Piped into grep or a file there is no terminal width to respect: one row per line.
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(table)


def _health(row) -> str:
    notes = ["STALE" if row.stale else "ok"]
    if row.last_heard_s is not None and row.age_s is not None and abs(row.last_heard_s - max(row.age_s, 0)) > 1:
        notes.append(f"heard {row.last_heard_s:.0f} s ago")
    if row.clock_ahead:
        notes.append("clock ahead")
    if row.status is not None and row.status.state.value != "online":
        notes.append(f"sync {row.status.state.value}")
    if row.claimed_device:
        notes.append(f"payload claims {row.claimed_device}")
    return ", ".join(notes)
