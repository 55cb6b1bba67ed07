"""The fleet bench's processes (and the 50-device test's: tests/test_fleet_scale.py runs this same rig):
a TLS fleet broker with the committed cloud.conf and cloud.acl, a certificate per device and per fleet
identity, an S3 server (moto) holding the registry and the telemetry, real cloud_ingest replicas, a
small signed ONNX model published twice, and `edgefleet simulate run` processes, each running a share
of the simulated devices. Rollouts go through `edgefleet rollout start|promote`, the operators' own
command, as a child process: the code path an operator's terminal takes.

One owner: FleetRig starts everything and `close()` stops it all, children first (SIGTERM: each drains
and exits), then the servers.

Open files: a thousand TLS clients mean a thousand sockets in mosquitto, and a few hundred in each
simulator process. The rig lifts this process's soft RLIMIT_NOFILE to its hard limit (the simulator's own
raise_open_files) before anything is spawned, so every child (mosquitto, the simulators, the replicas)
inherits it: a CI runner's soft limit may be 1024.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from edgefleet.broker import Broker
from edgefleet.brokerconf import cloud_listener
from edgefleet.certs import issue, issue_device, issue_service, new_ca
from edgefleet.publish import publish
from edgefleet.s3server import S3Server
from edgefleet.simulate import predictions
from edgefleet.simulate.fleet import raise_open_files
from edgefleet.spawner import COMMAND, Child, keys_of, stop_all
from edgefleet.waiting import wait_until
from shared import registry, s3
from shared.config import CommonSettings, IngestSettings, StoreSettings, environment, load
from shared.manifest import MANIFEST_FILE, sha256_of

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

MODEL = "fleet-bench"
BUCKET = "edgefleet-telemetry"
REPLICA_CERTS = ("cloud-ingest-0", "cloud-ingest-1")
OPERATOR, CONSOLE = "operator", "console"
LABELS = [f"class-{n}" for n in range(10)]


def device_ids(prefix: str, first: int, count: int) -> list[str]:
    """The simulator's device ids for devices first .. first+count-1 (`<prefix>-<n, 5 digits>`, as
    `edgefleet simulate run --prefix P --first K` names them)."""
    return [f"{prefix}-{n:05d}" for n in range(first, first + count)]


def make_model(folder: Path, weight_bytes: int, version: int) -> Path:
    """A real, runnable ONNX classifier with about `weight_bytes` of float32 weights, and its manifest.

    x [batch, 3, s, s] -> Flatten -> MatMul W [3*s*s, 10] -> Softmax; s is chosen so W holds about
    `weight_bytes`. Each version has its own random weights (a new artifact, a new SHA-256).

    Args:
        folder: created; model.onnx and manifest.json are written into it.
        weight_bytes: the size the weights aim at (>= 4 KiB).
        version: the manifest's version (and the weights' seed).

    Returns:
        The folder.
    """
    side = max(2, round((weight_bytes / (3 * len(LABELS) * 4)) ** 0.5))
    features = 3 * side * side
    weights = np.random.default_rng(version).standard_normal((features, len(LABELS)), dtype=np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["output"], axis=1)],
        MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(LABELS)])],
        [numpy_helper.from_array(weights, "weights")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    manifest = {
        "name": MODEL, "version": version, "sha256": sha256_of(path), "size_bytes": path.stat().st_size,
        "opset": 17, "input": {"name": "input", "shape": ["batch", 3, side, side], "dtype": "float32"},
        "output": {"name": "output", "shape": ["batch", len(LABELS)], "dtype": "float32"},
        "preprocessing": {"resize_shorter": side, "crop": side, "color_order": "RGB", "interpolation": "linear",
                          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "labels": LABELS, "recipe": {"source": "edgefleet bench fleet: random weights"}, "created_at": 0.0,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return folder


@dataclass
class SimOptions:
    """What each `edgefleet simulate run` process is given besides its devices (its CLI's options)."""

    records_per_s: float = 5.0
    predictions_per_s: float = 20.0
    connect_spread_s: float = 5.0
    cut_share: float = 0.0
    cut_at_s: float = 0.0
    cut_for_s: float = 0.0
    duration_s: float = 0.0  # 0: records for as long as it runs
    extra: Sequence[str] = ()

    def args(self) -> list[str]:
        args = ["--records-per-s", f"{self.records_per_s:g}", "--predictions-per-s", f"{self.predictions_per_s:g}",
                "--connect-spread-s", f"{self.connect_spread_s:g}", "--duration-s", f"{self.duration_s:g}"]
        if self.cut_share > 0:
            args += ["--cut-share", f"{self.cut_share:g}", "--cut-at-s", f"{self.cut_at_s:g}",
                     "--cut-for-s", f"{self.cut_for_s:g}"]
        return args + list(self.extra)


@dataclass
class SimProcess:
    """One simulator process: its devices, its stats file, its devices' state folder, its child."""

    child: Child
    devices: list[str]
    stats_path: Path
    state_dir: Path
    started_at: float = field(default=0.0)

    def outbox(self, device: str) -> Path:
        """A device's outbox file (edgefleet/simulate/telemetry.py: <state>/<device>/outbox.db)."""
        return self.state_dir / device / "outbox.db"


class FleetRig:
    """The cloud side of a fleet on this machine, and simulated devices on it.

    Args:
        work: a folder for certificates, keys, models and logs (created).
        devices: how many device certificates to issue (prefix-0 .. prefix-N-1).
        replicas: cloud_ingest replicas (at most len(REPLICA_CERTS): cloud.acl names one user each).
        prefix: the devices' id prefix.
        state_root: where the simulators keep their devices' state (a tmpfs by default: /dev/shm).
        model_bytes: the bench model's weights.
    """

    def __init__(self, work: Path, devices: int, *, replicas: int = 2, prefix: str = "sim",
                 state_root: Path | None = None, model_bytes: int = 1 << 20) -> None:
        if not 1 <= replicas <= len(REPLICA_CERTS):
            raise ValueError(f"replicas: 1 to {len(REPLICA_CERTS)} (cloud.acl has a user for each)")
        self.work, self.devices, self.replicas, self.prefix = work, devices, replicas, prefix
        self.model_bytes = model_bytes
        self.certs, self.keys, self.logs = work / "certs", work / "keys", work / "logs"
        shm = Path("/dev/shm")  # noqa: S108  a parent for mkdtemp, not a file opened
        self._state_root = state_root or (shm if shm.is_dir() and os.access(shm, os.W_OK) else work)
        self._state_dir: Path | None = None  # made by start(), removed by close()
        self.open_files = raise_open_files()
        # Made here, started by start(): the broker as shipped (cloud.conf's directives: persistence, a
        # snapshot a second; cloud.acl; no set_tcp_nodelay, which only edge.conf sets), the store.
        self.broker = Broker(security=cloud_listener(self.certs), persistent=True, workdir=work / "broker",
                             tcp_nodelay=False)
        self.store = S3Server()
        self.ingest: list[Child] = []
        self.simulators: list[SimProcess] = []
        self.seed_dir = work / "model-v1"
        self.model_v2 = work / "model-v2"
        self.predictions = work / "predictions.json"

    # -- start ---------------------------------------------------------------------------------------

    def start(self) -> FleetRig:
        """Certificates, the broker, the store, the replicas and the published model (v1 and v2)."""
        for folder in (self.certs, self.keys, self.logs, self.broker.workdir):
            folder.mkdir(parents=True, exist_ok=True)
        self._state_dir = Path(tempfile.mkdtemp(prefix="edgefleet-fleet-", dir=self._state_root))
        new_ca(self.certs)
        issue(self.certs, "cloud-broker", server=True)
        for name in (OPERATOR, CONSOLE, *REPLICA_CERTS[:self.replicas]):
            issue_service(self.certs, name)
        for device in device_ids(self.prefix, 0, self.devices):
            issue_device(self.certs, device)
        self.broker.start()
        self.store.start()
        self.ingest = [self._start_replica(n) for n in range(self.replicas)]
        self._publish_models()
        # The predictions simulated inference draws from: the bench model's own, run once over the bundled
        # photos (the repository's var/simulate recording is the real model's, and not there on CI).
        predictions.record(self.seed_dir, self.predictions)
        for n, child in enumerate(self.ingest):
            wait_until(lambda c=child: "connected to broker" in c.log() or not c.alive(), 60,  # type: ignore[misc]
                       f"cloud_ingest replica {n} to subscribe")
            if not child.alive():
                raise RuntimeError(f"cloud_ingest replica {n} exited: {child.log()[-2000:]}")
        return self

    @property
    def state_dir(self) -> Path:
        """Where the simulators keep their devices' state (on tmpfs where there is one).

        Raises:
            RuntimeError: before start().
        """
        if self._state_dir is None:
            raise RuntimeError("the rig is not started")
        return self._state_dir

    @property
    def fleet_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def client_settings(self, name: str) -> CommonSettings:
        """A fleet client's settings with the certificate `name` (operator, console, a replica's): the
        shipped defaults, with only this machine's broker address and the certificate's files (device_id
        is the certificate's name, as cloud.conf's use_identity_as_username requires)."""
        return load(CommonSettings, None, mqtt_url=self.fleet_url, device_id=name,
                    mqtt_ca_file=self.certs / "ca.crt", mqtt_cert_file=self.certs / f"{name}.crt",
                    mqtt_key_file=self.certs / f"{name}.key")

    def store_settings(self, name: str = OPERATOR) -> StoreSettings:
        """The registry's and the fleet broker's settings for a client with the certificate `name`."""
        return load(StoreSettings, None, **{**keys_of(self.store.settings()),
                                            **keys_of(self.client_settings(name))})

    def s3(self) -> S3Client:
        return s3.client(self.store.settings())

    def _start_replica(self, n: int) -> Child:
        """Replica n, started (start() waits until it subscribes, while the model is published), with the
        shipped settings as compose and k3s give them: device_id its certificate's name (cloud-ingest-<n>),
        only the addresses, files and bucket of this machine's servers set."""
        cert = REPLICA_CERTS[n]
        settings = load(IngestSettings, None, **{
            **keys_of(self.store.settings()), **keys_of(self.client_settings(cert)), "telemetry_bucket": BUCKET})
        return Child("cloud-ingest", self.logs / f"ingest-{n}.log", settings, name=f"ingest-{n}")

    def _publish_models(self) -> None:
        client = self.s3()
        pair = registry.new_key_pair(self.keys)
        bucket = self.store_settings().registry_bucket
        make_model(self.seed_dir, self.model_bytes, 1)
        make_model(self.model_v2, self.model_bytes, 2)
        publish(client, bucket, self.seed_dir, pair.private, MODEL, 1)
        publish(client, bucket, self.model_v2, pair.private, MODEL, 2)
        # The seed is v1 exactly as the registry holds it (its manifest as published), as if installed from it.
        manifest = client.get_object(Bucket=bucket, Key=registry.key(MODEL, 1, registry.MANIFEST_OBJECT))["Body"].read()
        (self.seed_dir / MANIFEST_FILE).write_bytes(manifest)
        (self.keys / "operator.key").rename(self.work / "operator.key")  # devices trust the public half only

    # -- simulators ----------------------------------------------------------------------------------

    def start_simulators(self, first: int, count: int, processes: int, options: SimOptions,
                         tag: str = "sim") -> list[SimProcess]:
        """`edgefleet simulate run` processes for devices first .. first+count-1, split evenly.

        Args:
            first: the first device's number.
            count: how many devices.
            processes: how many processes share them.
            options: their rates, cuts and duration.
            tag: names their logs and stats files (`<tag>-<n>`).

        Returns:
            The processes started (also kept for close()).
        """
        started = []
        share, rest = divmod(count, processes)
        at = first
        for p in range(processes):
            n = share + (1 if p < rest else 0)
            if n == 0:
                continue
            stats, state = self.work / f"{tag}-{p}.json", self.state_dir / f"{tag}-{p}"
            args = ["run", "--devices", str(n), "--first", str(at), "--prefix", self.prefix,
                    "--fleet-url", self.fleet_url, "--certs", str(self.certs), "--trusted-keys", str(self.keys),
                    "--seed-model", str(self.seed_dir), "--predictions", str(self.predictions), "--stats", str(stats),
                    "--state-dir", str(state), *options.args()]
            child = Child("simulate", self.logs / f"{tag}-{p}.log", self.store.settings(), args=args,
                          name=f"{tag}-{p}")
            process = SimProcess(child, device_ids(self.prefix, at, n), stats, state, child.started)
            self.simulators.append(process)
            started.append(process)
            at += n
        return started

    # -- rollouts through the operators' command ----------------------------------------------------

    def rollout(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """`edgefleet rollout <args>` as the operator, against this fleet and registry.

        Raises:
            RuntimeError: it exited non-zero (its standard error in the message).
        """
        env = {**os.environ, **environment(self.store_settings(OPERATOR)),
               "EDGEFLEET_TRUSTED_KEYS_DIR": str(self.keys)}
        done = subprocess.run([*COMMAND, "rollout", *args], env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"edgefleet rollout {' '.join(args)}: exit {done.returncode}: {done.stderr[-2000:]}")
        return done

    def start_rollout(self, version: int, canary_percent: float,
                      max_concurrent: int | None = None) -> tuple[str, str]:
        """`edgefleet rollout start fleet-bench VERSION --canary P [--max-concurrent-downloads K]`.

        Returns:
            The rollout's id and the command's standard error (the canary plan's line).
        """
        args = ["start", MODEL, str(version), "--canary", f"{canary_percent:g}"]
        if max_concurrent is not None:
            args += ["--max-concurrent-downloads", str(max_concurrent)]
        done = self.rollout(*args)
        return done.stdout.strip().splitlines()[-1], done.stderr

    def promote(self, max_concurrent: int | None = None) -> str:
        """`edgefleet rollout promote [--max-concurrent-downloads K]`; returns its lines (the pacing's)."""
        args = ["promote"] + (["--max-concurrent-downloads", str(max_concurrent)] if max_concurrent is not None else [])
        return self.rollout(*args).stderr

    # -- meters --------------------------------------------------------------------------------------

    def broker_process(self) -> psutil.Process:
        if self.broker.process is None:
            raise RuntimeError("the broker is not started")
        return psutil.Process(self.broker.process.pid)

    def store_process(self) -> psutil.Process:
        if self.store.process is None:
            raise RuntimeError("the store is not started")
        return psutil.Process(self.store.process.pid)

    def ingest_processes(self) -> list[psutil.Process]:
        return [psutil.Process(c.proc.pid) for c in self.ingest]

    # -- stop ----------------------------------------------------------------------------------------

    def stop_simulators(self, processes: Sequence[SimProcess] | None = None, grace_s: float = 30) -> None:
        """SIGTERM to the simulators (each closes its devices and exits), SIGKILL after `grace_s`."""
        stop_all([p.child for p in (processes if processes is not None else self.simulators)], grace_s)

    def close(self) -> None:
        """Stops the simulators, the replicas, then the servers; removes the devices' state. Every step runs
        whatever an earlier one raised (ExitStack: the callbacks run last first, the first error re-raised)."""
        with contextlib.ExitStack() as steps:
            if self._state_dir is not None:
                steps.callback(shutil.rmtree, self._state_dir, ignore_errors=True)
            steps.callback(self.broker.close)
            steps.callback(self.store.close)
            steps.callback(stop_all, self.ingest, 15)
            self.stop_simulators()

    def __enter__(self) -> FleetRig:
        try:
            return self.start()
        except BaseException:
            self.close()  # what started before the failure stops with it
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
