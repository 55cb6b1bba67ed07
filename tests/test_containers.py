"""The shipped deployment, run for real: the images built from the Dockerfile (on local stand-ins for
the public base images, scripts/images.sh), docker-compose.yml's edge and cloud profiles brought up by
docker-compose with tests/compose.host.yml (host networking, the S3 stand-in; nothing else swapped),
and faults injected into the containers. One module, one built set of images, one stack.

A Docker engine is needed (scripts/engine.sh starts one); with CI=true its absence fails the module."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as mqtt
import pytest
import yaml

from edgefleet.waiting import wait_until
from shared import topics
from shared.codec import decode
from shared.schemas import PluginState, Prediction, ServiceStatus
from tests.image_build import engine_available, wait_built

REPO = Path(__file__).resolve().parents[1]
M = TypeVar("M", Prediction, ServiceStatus)
EDGEFLEET = REPO / ".venv" / "bin" / "edgefleet"
PROJECT = "efh"
DEVICE, CAMERA = "device-1", "cam-1"
LAN_CAMERA = "cam-lan"  # a camera of the test's, on the broker's TLS listener for the device's network
EDGE = ("broker", "sync", "inference", "telemetry", "camera")
CLOUD = ("cloud-broker", "minio", "cloud-ingest-0", "cloud-ingest-1", "console")
HEALTHCHECKED = ("broker", "sync", "inference", "telemetry", "cloud-broker", "cloud-ingest-0", "cloud-ingest-1",
                 "console")
CONSOLE_URL = "http://127.0.0.1:8080/"  # docker-compose.yml's console port (the host's, under host networking)
SERVICE_UID = 10001

pytestmark = [pytest.mark.timeout(900), pytest.mark.images]


def _engine() -> None:
    if engine_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("no Docker engine: scripts/engine.sh should have started one", pytrace=False)
    pytest.skip("no Docker engine here (scripts/engine.sh starts one)")


def _run(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


class Stack:
    """The compose project in a folder of its own: var/ made by scripts/compose-init.sh, deploy/ linked.

    The files are merged by docker-compose itself (`config`): docker-compose.yml, the opt-in
    docker-compose.docker-stats.yml (telemetry's per-container figures) and tests/compose.host.yml.
    From the merged file only the published ports are dropped: they mean nothing under host networking,
    and docker-compose 1.29 refuses them there ("host" network_mode is incompatible with port_bindings),
    while its merge of an override can add ports but never remove them."""

    FILES = (REPO / "docker-compose.yml", REPO / "docker-compose.docker-stats.yml", REPO / "tests" / "compose.host.yml")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.var = folder / "var"
        self.published = False
        self.env = {"DOCKER_GID": str(Path("/var/run/docker.sock").stat().st_gid), "COMPOSE_PROJECT_NAME": PROJECT}
        files = [arg for path in self.FILES for arg in ("-f", str(path))]
        merged = yaml.safe_load(_run("docker-compose", "--project-directory", str(folder), *files,
                                     "--profile", "edge", "--profile", "cloud", "config", env=self.env, cwd=folder))
        for service in merged["services"].values():
            assert service["network_mode"] == "host"
            service.pop("ports", None)
        self.file = folder / "compose.merged.yml"
        self.file.write_text(yaml.safe_dump(merged, sort_keys=False))

    def compose(self, *args: str, check: bool = True) -> str:
        return _run("docker-compose", "-p", PROJECT, "--project-directory", str(self.folder), "-f", str(self.file),
                    "--profile", "edge", "--profile", "cloud", *args, check=check, env=self.env, cwd=self.folder)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).split()
        assert ids, f"no container for {service}"
        return ids[0]

    def inspect(self, service: str) -> dict:
        return json.loads(_run("docker", "inspect", self.container(service)))[0]

    def health(self, service: str) -> str | None:
        state = self.inspect(service)["State"]
        return state.get("Health", {}).get("Status") if state["Running"] else None

    def wait_healthy(self, *services: str, timeout: float = 180) -> None:
        for service in services:
            wait_until(lambda service=service: self.health(service) == "healthy", timeout, f"{service} healthy",
                       interval=1)

    def logs(self, service: str, tail: int = 60) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), service, check=False)

    def password(self, user: str) -> str:
        return (self.var / "broker" / f"{user}.password").read_text().strip()

    def s3_env(self) -> dict[str, str]:
        return {"EDGEFLEET_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                "EDGEFLEET_S3_ACCESS_KEY_ID": (self.var / "s3" / "access-key").read_text(),
                "EDGEFLEET_S3_SECRET_ACCESS_KEY": (self.var / "s3" / "secret-key").read_text()}

    def operator_env(self) -> dict[str, str]:
        certs = self.var / "certs"
        return {"EDGEFLEET_MQTT_URL": "mqtts://localhost:8883", "EDGEFLEET_DEVICE_ID": "operator",
                "EDGEFLEET_MQTT_CA_FILE": str(certs / "ca.crt"),
                "EDGEFLEET_MQTT_CERT_FILE": str(certs / "operator.crt"),
                "EDGEFLEET_MQTT_KEY_FILE": str(certs / "operator.key")}

    def publish_v2(self) -> None:
        """The seed model, signed and published as version 2 with the operator's CLI (once)."""
        if not self.published:
            self.edgefleet("model", "publish", str(self.var / "models" / "efficientnet-lite0"), "--version", "2",
                           "--key", str(self.var / "keys" / "operator.key"), env=self.s3_env())
            self.published = True

    def edgefleet(self, *args: str, env: dict[str, str]) -> str:
        return _run(str(EDGEFLEET), *args, env=env, cwd=self.folder)


class Watch:
    """A console-user subscriber on the device broker (loopback)."""

    def __init__(self, stack: Stack, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        self.client.username_pw_set("console", stack.password("console"))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        assert subscribed.wait(30), f"no SUBACK for {topic}"

    def prediction(self, timeout: float = 60, where=lambda p: True) -> Prediction:
        return self.message(Prediction, timeout, where)

    def message(self, kind: type[M], timeout: float = 60, where=lambda m: True) -> M:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, payload = self.messages.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            message = decode(kind, payload)  # no content type: JSON by its leading '{', else msgpack
            if where(message):
                return message
        raise AssertionError(f"no matching {kind.__name__} in time")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _engine()
    wait_built()
    folder = tmp_path_factory.mktemp("compose")
    (folder / "deploy").symlink_to(REPO / "deploy")
    (folder / "var" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "var" / "models" / "efficientnet-lite0", folder / "var" / "models" / "efficientnet-lite0")
    _run(str(REPO / "scripts" / "compose-init.sh"),
         env={"EDGEFLEET": str(EDGEFLEET), "CAMERAS": f"{CAMERA},{LAN_CAMERA}"}, cwd=folder)
    s = Stack(folder)
    s.compose("down", "-v", "--remove-orphans", check=False)
    try:
        s.compose("up", "-d", "--no-build", *CLOUD)
        s.wait_healthy("cloud-broker", "minio")
        _run(str(REPO / "scripts" / "compose-init.sh"), "--device-key", env={"EDGEFLEET": str(EDGEFLEET)}, cwd=folder)
        s.compose("up", "-d", "--no-build", *EDGE)
        s.wait_healthy(*HEALTHCHECKED)
        yield s
    finally:
        for service in (*EDGE, *CLOUD):
            print(f"--- {service}\n{s.logs(service, 40)}")
        s.compose("down", "-v", "--remove-orphans", check=False)


def test_every_service_turns_healthy_and_the_camera_container_is_answered(stack):
    for service in HEALTHCHECKED:
        assert stack.health(service) == "healthy", stack.logs(service)
    watch = Watch(stack, topics.predictions(DEVICE, CAMERA))
    try:
        prediction = watch.prediction()
    finally:
        watch.close()
    assert prediction.camera == CAMERA and prediction.top and prediction.model.name == "efficientnet-lite0"
    # The console container serves its page, and sees the containerised device through the fleet broker
    # (the device's statuses bridged up, read with the console's own certificate).
    page = _get(CONSOLE_URL)
    assert "edgefleet" in page and 'id="devices"' in page and "console.js" in page, page[:500]

    def device_listed() -> dict | None:
        fleet = json.loads(_get(CONSOLE_URL + "api/fleet"))
        return next((d for d in fleet["devices"] if d["device"] == DEVICE and d["health"] == "online"), None)

    device = wait_until(device_listed, 60, f"{DEVICE} online on the console", interval=1)
    assert device["model"] and device["model"].startswith("efficientnet-lite0"), device


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310  # http://127.0.0.1 only
        assert response.status == 200, url
        return response.read().decode()


def test_no_container_has_an_address_of_its_own_and_root_filesystems_are_read_only(stack):
    for service in (*EDGE, *CLOUD):
        info = stack.inspect(service)
        assert info["HostConfig"]["NetworkMode"] == "host", service
        assert not any(net.get("IPAddress") for net in info["NetworkSettings"]["Networks"].values()), service
    for service in ("sync", "inference", "telemetry", "camera", "cloud-ingest-0", "console"):
        denied = subprocess.run(["docker", "exec", stack.container(service), "touch", "/opt/edgefleet/written"],
                                capture_output=True, text=True)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (service, denied.stderr)


def test_a_camera_on_the_lan_listener_is_answered_over_tls_with_its_password(stack):
    """The containerised broker's 8884 (TLS, a password per camera): a frame from a camera that checks
    the broker against the fleet CA is answered; the same camera without TLS is refused there."""
    from edgefleet import photos

    watch = Watch(stack, topics.predictions(DEVICE, LAN_CAMERA))
    camera = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=LAN_CAMERA)
    camera.username_pw_set(LAN_CAMERA, stack.password(LAN_CAMERA))
    camera.tls_set(ca_certs=str(stack.var / "certs" / "ca.crt"))
    try:
        camera.connect("localhost", 8884)
        camera.loop_start()
        camera.publish(topics.frames(DEVICE, LAN_CAMERA), photos.jpeg("chelsea"), qos=1).wait_for_publish(30)
        prediction = watch.prediction(timeout=60)
    finally:
        camera.loop_stop()
        camera.disconnect()
        watch.close()
    assert prediction.camera == LAN_CAMERA and prediction.top
    assert _plain_mqtt_refused(stack, 8884), "the LAN listener took MQTT without TLS"


def _plain_mqtt_refused(stack: Stack, port: int) -> bool:
    """A camera's right password over plain TCP: True when the listener ends it without a CONNACK success."""
    outcome: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{LAN_CAMERA}-plain")
    client.username_pw_set(LAN_CAMERA, stack.password(LAN_CAMERA))
    client.on_connect = lambda c, u, flags, rc, props: outcome.put(rc.is_failure)
    client.on_disconnect = lambda c, u, flags, rc, props: outcome.put(True)
    try:
        client.connect("localhost", port)
    except OSError:
        return True
    client.loop_start()
    try:
        return outcome.get(timeout=15)
    finally:
        client.loop_stop()


def test_telemetry_reports_its_projects_containers_through_the_docker_api(stack):
    """docker-compose.docker-stats.yml (opt-in) gives telemetry the Docker API: its resource samples in
    S3 name this project's containers with their memory."""
    import gzip

    import boto3

    env = stack.s3_env()
    store = boto3.client("s3", endpoint_url=env["EDGEFLEET_S3_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id=env["EDGEFLEET_S3_ACCESS_KEY_ID"],
                         aws_secret_access_key=env["EDGEFLEET_S3_SECRET_ACCESS_KEY"])

    def reported() -> dict[str, int]:
        memory = {}
        for obj in store.list_objects_v2(Bucket="edgefleet-telemetry", Prefix="telemetry/metric/").get("Contents", []):
            body = gzip.decompress(store.get_object(Bucket="edgefleet-telemetry", Key=obj["Key"])["Body"].read())
            for line in body.splitlines():
                memory |= {c["name"]: c["memory_bytes"] for c in json.loads(line)["body"]["containers"]}
        return memory if {f"{PROJECT}_{s}_1" for s in ("inference", "sync", "broker")} <= memory.keys() else {}

    memory = wait_until(reported, 120, "the stack's containers in telemetry's resource samples", interval=3)
    assert all(name.startswith(f"{PROJECT}_") for name in memory), memory
    assert memory[f"{PROJECT}_inference_1"] > 0


def test_every_service_writes_its_empty_volume_as_uid_10001(stack):
    for volume, service in (("model-store", "sync"), ("telemetry-queue", "telemetry")):
        wait_until(lambda volume=volume: _volume_files(volume), 60, f"{service} wrote to {volume}", interval=1)
        owners = {line.split(" ", 1)[0] for line in _volume_files(volume)}
        assert owners == {str(SERVICE_UID)}, (volume, _volume_files(volume))


def _volume_files(volume: str) -> list[str]:
    """`uid path` of everything in a named volume, read by a throwaway container."""
    out = _run("docker", "run", "--rm", "--network", "host", "-v", f"{PROJECT}_{volume}:/v:ro", "--entrypoint", "find",
               "python:3.11-slim", "/v", "-mindepth", "1", "-printf", "%U %p\\n")
    return out.splitlines()


def test_the_device_key_reads_the_registry_and_cannot_write_or_delete(stack):
    import boto3
    from botocore.exceptions import ClientError

    keys = stack.var / "s3" / DEVICE
    device = boto3.client("s3", endpoint_url="http://127.0.0.1:9000", region_name="us-east-1",
                          aws_access_key_id=(keys / "access-key").read_text().strip(),
                          aws_secret_access_key=(keys / "secret-key").read_text().strip())
    stack.publish_v2()
    manifest = device.get_object(Bucket="edgefleet-models",
                                 Key="models/efficientnet-lite0/2/manifest.json")["Body"].read()
    assert json.loads(manifest)["name"] == "efficientnet-lite0"
    for attempt in (lambda: device.put_object(Bucket="edgefleet-models", Key="models/efficientnet-lite0/2/model.onnx",
                                              Body=b"x"),
                    lambda: device.delete_object(Bucket="edgefleet-models",
                                                 Key="models/efficientnet-lite0/2/manifest.json"),
                    lambda: device.list_objects_v2(Bucket="edgefleet-telemetry")):
        with pytest.raises(ClientError) as refused:
            attempt()
        assert refused.value.response["Error"]["Code"] in ("AccessDenied", "403"), refused.value.response


def test_a_rollout_through_the_containerised_fleet_broker_reaches_the_device(stack):
    stack.publish_v2()
    watch = Watch(stack, topics.predictions(DEVICE, CAMERA))
    try:
        stack.edgefleet("rollout", "start", "efficientnet-lite0", "2", "--trusted-keys", str(stack.var / "keys"),
                        env={**stack.operator_env(), **stack.s3_env()})
        prediction = watch.prediction(timeout=240, where=lambda p: p.model.version == 2)
    finally:
        watch.close()
    assert prediction.model.name == "efficientnet-lite0" and prediction.top


def test_a_plugin_rollout_through_the_containerised_fleet_reaches_inference_in_its_container(stack):
    """The shipped path end to end: publish with the operator's CLI, the plugin's retained rollout over the TLS
    fleet broker and the bridge, sync's download with the device's key (plugins/*), the plugin store volume,
    and inference compiling and running the module in its read-only container."""
    built = REPO / "var" / "plugin-builds"
    stack.edgefleet("plugin", "publish", str(built / "site-labels.wasm"), "--spec", str(built / "site-labels.json"),
                    "--key", str(stack.var / "keys" / "operator.key"), env=stack.s3_env())
    status = Watch(stack, topics.status(DEVICE, "inference"))
    try:
        stack.edgefleet("rollout", "start", "site-labels", "1", "--plugin", "--trusted-keys",
                        str(stack.var / "keys"), env={**stack.operator_env(), **stack.s3_env()})
        running = status.message(ServiceStatus, timeout=240, where=lambda s: any(
            p.plugin.name == "site-labels" and p.calls > 0 for p in s.plugins or []))
    finally:
        status.close()
    plugin = next(p for p in running.plugins or [] if p.plugin.name == "site-labels")
    assert plugin.state is PluginState.ACTIVE and plugin.faults == 0, plugin


def test_telemetry_reaches_the_s3_store_through_the_bridge(stack):
    rows = wait_until(lambda: _audit(stack).get(DEVICE, {}).get("received"), 180, "device-1's telemetry in S3",
                      interval=2)
    assert rows > 0


def _audit(stack: Stack) -> dict[str, dict]:
    out = _run(str(EDGEFLEET), "telemetry", "audit", "--json", env=stack.s3_env(), check=False)
    return {row["device"]: row for row in map(json.loads, out.splitlines())}


def _service_pid(stack: Stack, service: str) -> int:
    """The host pid of the container's service process: under `init: true` the child of docker-init,
    else the container's first process (the brokers)."""
    import psutil

    info = stack.inspect(service)
    pid = info["State"]["Pid"]
    children = psutil.Process(pid).children() if info["HostConfig"].get("Init") else []
    return children[0].pid if children else pid


def _restarts(stack: Stack, service: str) -> int:
    return stack.inspect(service)["RestartCount"]


def _predictions_flow(stack: Stack, timeout: float = 120) -> Prediction:
    watch = Watch(stack, topics.predictions(DEVICE, CAMERA))
    try:
        return watch.prediction(timeout=timeout)
    finally:
        watch.close()


def _audit_clean(stack: Stack, timeout: float = 240) -> dict:
    """The device's audit once every record it numbered is in S3: nothing acknowledged lost (no
    unexplained gap, nothing declared lost), nothing stored twice."""
    def settled():
        row = _audit(stack).get(DEVICE)
        return row if row and row["missing_count"] == 0 and row["received"] > 0 else None

    row = wait_until(settled, timeout, "device-1's audit without unexplained gaps", interval=3)
    assert row["duplicates"] == 0 and not row["declared_lost"], row
    return row


@pytest.mark.parametrize("services", [("inference", "sync", "telemetry", "cloud-ingest-0", "cloud-ingest-1"),
                                      ("broker", "cloud-broker")],
                         ids=["services", "brokers"])
def test_containers_killed_under_load_are_restarted_and_lose_nothing(stack, services):
    """SIGKILL of each service's process from the host, at once, as a crash or the OOM killer would end
    them. Not `docker kill -s KILL`: Docker counts that as a manual stop and its restart policy then
    leaves the container down (measured on this engine: RestartCount stays 0), no test of recovery."""
    _predictions_flow(stack)  # under load: the camera's frames are being answered
    received = _audit(stack).get(DEVICE, {}).get("received", 0)
    before = {service: _restarts(stack, service) for service in services}
    for service in services:
        os.kill(_service_pid(stack, service), signal.SIGKILL)
    for service in services:
        wait_until(lambda service=service: (_restarts(stack, service) > before[service]
                                            and stack.inspect(service)["State"]["Running"]),
                   60, f"{service} restarted by its policy", interval=1)
    stack.wait_healthy(*HEALTHCHECKED)
    assert _predictions_flow(stack).top, f"predictions flow again after {services} were killed"
    wait_until(lambda: _audit(stack)[DEVICE]["received"] > received, 180, "new telemetry after the kills", interval=3)
    _audit_clean(stack)


def test_restarting_the_whole_edge_profile_loses_nothing(stack):
    received = _audit_clean(stack)["received"]
    stack.compose("restart", *EDGE)
    stack.wait_healthy(*HEALTHCHECKED)
    _predictions_flow(stack)
    wait_until(lambda: _audit(stack)[DEVICE]["received"] > received, 180, "new telemetry after the restart", interval=3)
    _audit_clean(stack)


def test_a_frozen_service_turns_unhealthy_and_is_restarted(stack):
    """SIGSTOP freezes the inference process whole (its broker link, its heartbeat, its worker): the
    health check sees the stale heartbeat, reports unhealthy, and past --kill-after ends the process so
    the restart policy brings the container back."""
    info = stack.inspect("inference")
    before = info["RestartCount"]
    os.kill(_service_pid(stack, "inference"), signal.SIGSTOP)
    wait_until(lambda: stack.health("inference") == "unhealthy", 120, "inference unhealthy", interval=0.5)
    assert _restarts(stack, "inference") == before, "killed before its health check reported it"
    wait_until(lambda: _restarts(stack, "inference") > before, 240, "inference restarted", interval=2)
    stack.wait_healthy("inference")
    assert _predictions_flow(stack).top
