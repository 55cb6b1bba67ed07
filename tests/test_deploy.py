"""Deployment files, checked offline: docker-compose.yml against the Compose Specification's schema
(vendored in check-jsonschema), every k3s manifest against the Kubernetes OpenAPI schemas (bundled in
kubernetes-validate), the file as docker-compose 1.29 reads it, and every container running the
command the tests run; each check is shown to fail on a broken file. The images and the compose stack
run for real in tests/test_containers.py (no cluster exists here). The overlays, rendered by kubectl
and read container by container, are tests/test_k3s.py's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.config import InferenceSettings, load
from tests.support import ServiceProcess, wait_until

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"
# The services as the tests start them: `python -m edgefleet <service>` (tests/support.py ServiceProcess).
SERVICES = {"inference", "sync", "telemetry", "cloud-ingest", "console", "camera"}
MANIFESTS = sorted(p for p in (REPO / "k3s" / "base").rglob("*.yaml") if p.name != "kustomization.yaml")


def _compose_check(path: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_the_compose_file_validates_and_a_broken_one_does_not(tmp_path):
    ok = _compose_check(REPO / "docker-compose.yml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "docker-compose.yml"
    compose = (REPO / "docker-compose.yml").read_text()
    broken.write_text(compose.replace("restart: unless-stopped", "restart: [sometimes]", 1))
    result = _compose_check(broken)
    assert result.returncode != 0 and "restart" in result.stdout + result.stderr


def _compose_v1_check(compose: Path, *overrides: Path) -> subprocess.CompletedProcess:
    """docker-compose 1.29 (what runs here) validates against its own schema; it refused the top-level
    `name:` that Compose v2 takes, so both must accept the file. Secrets' files need not exist for this."""
    files = [arg for path in (compose, *overrides) for arg in ("-f", str(path))]
    return subprocess.run(["docker-compose", *files, "--project-directory", str(REPO), "config", "-q"],
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "COMPOSE_PROJECT_NAME": "check", "DOCKER_GID": "999"})


def test_compose_gives_each_service_only_its_own_secrets():
    """Least privilege in docker-compose.yml: sync reads the registry with the device's key pair, never the
    S3 store's root keys; no service mounts var/certs whole (it holds the CA's private key)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services, secrets = compose["services"], compose["secrets"]
    sources = {name: {s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", [])}
               for name, svc in services.items()}
    assert {"device-s3-access-key", "device-s3-secret-key"} <= sources["sync"]
    root_files = {secrets["s3-access-key"]["file"], secrets["s3-secret-key"]["file"]}
    for name in ("sync", "inference", "telemetry", "camera", "broker"):
        assert not {secrets[s]["file"] for s in sources[name]} & root_files, f"{name} gets the S3 root keys"
    for name, svc in services.items():
        certs = [v for v in svc.get("volumes", []) if str(v).startswith("./var/certs")]
        assert not certs, f"{name} mounts var/certs whole"
    assert not any("ca.key" in spec["file"] or "operator.key" in spec["file"] for spec in secrets.values())


def test_docker_compose_1_29_accepts_the_file_and_the_test_override_and_refuses_a_broken_one(tmp_path):
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is missing: scripts/engine.sh installs it", pytrace=False)
        pytest.skip("docker-compose is not installed (scripts/engine.sh installs it)")
    for files in ((REPO / "docker-compose.yml",), (REPO / "docker-compose.yml", REPO / "tests" / "compose.host.yml"),
                  (REPO / "docker-compose.yml", REPO / "docker-compose.docker-stats.yml")):
        ok = _compose_v1_check(*files)
        assert ok.returncode == 0, (files, ok.stderr)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("name: edgefleet\n" + (REPO / "docker-compose.yml").read_text())
    refused = _compose_v1_check(broken)
    assert refused.returncode != 0 and "name" in refused.stderr, refused.stderr


def test_compose_serves_each_services_metrics_on_a_port_of_its_own_that_prometheus_scrapes():
    """Every edgefleet service but the camera sets EDGEFLEET_METRICS_PORT, a port no other service uses
    (under host networking, tests/compose.host.yml, they all share the host's), published on the host's
    loopback; deploy/prometheus/prometheus.yml scrapes exactly those ports."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    ports: dict[str, int] = {}
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith("edgefleet/") or service["command"][0] == "camera":
            continue
        port = int(service["environment"]["EDGEFLEET_METRICS_PORT"])
        assert port not in ports.values(), f"{name}: metrics port {port} taken twice"
        ports[name] = port
        assert f"127.0.0.1:{port}:{port}" in service.get("ports", []), f"{name}: {port} not published on loopback"
    assert set(ports) == {"inference", "sync", "telemetry", "cloud-ingest-0", "cloud-ingest-1", "console"}
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [target for job in scrape["scrape_configs"] for group in job["static_configs"]
               for target in group["targets"]]
    assert sorted(targets) == sorted(f"127.0.0.1:{port}" for port in ports.values())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_k3s_manifest_validates(path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    document = next(yaml.safe_load_all((REPO / "k3s/base/cloud/cloud-ingest.yaml").read_text()))
    document["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    document["spec"]["replicas"] = 2
    document["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_kustomizations_name_only_files_that_exist():
    for kustomization in (REPO / "k3s").rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec.get("resources", []):
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_broker_configmaps_carry_the_tested_mosquitto_files_verbatim():
    for side, acl in (("edge", "edge.acl"), ("cloud", "cloud.acl")):
        data = yaml.safe_load((REPO / f"k3s/base/{side}/broker-config.yaml").read_text())["data"]
        assert data["mosquitto.conf"] == (REPO / f"deploy/mosquitto/{side}.conf").read_text()
        assert data[acl] == (REPO / f"deploy/mosquitto/{acl}").read_text()


def _commands() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"compose": set(), "k3s": set(), "dockerfile": set()}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if str(service.get("image", "")).startswith("edgefleet/"):
            found["compose"].add(service["command"][0])
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            template = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                if container["image"].startswith("edgefleet/"):
                    found["k3s"].add(container["args"][0])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["edgefleet"]' in dockerfile
    for target, command in re.findall(r"FROM runtime AS ([\w-]+)\n(?:.*\n)*?CMD \[\"([\w-]+)\"\]", dockerfile):
        assert target == command, f"the {target} image runs {command}"
        found["dockerfile"].add(command)
    return found


def test_every_container_runs_the_command_the_tests_run():
    found = _commands()
    assert found["dockerfile"] == SERVICES
    assert found["compose"] == SERVICES
    assert found["k3s"] == {"inference", "sync", "telemetry", "cloud-ingest", "console"}  # cameras are real ones on k3s


def test_the_health_check_follows_the_broker_link(broker, model_dir, tmp_path):
    health = tmp_path / "alive"
    settings = load(InferenceSettings, None, mqtt_url=broker.url, device_id="edge-h", model_dir=model_dir,
                    health_file=health, mqtt_reconnect_max_s=1)
    service = ServiceProcess(settings, tmp_path / "inference.log")
    check = [sys.executable, "-m", "edgefleet", "health", str(health), "--max-age", "7"]
    try:
        wait_until(lambda: subprocess.run(check).returncode == 0, 60, "a healthy heartbeat", interval=1)
        broker.kill()
        wait_until(lambda: subprocess.run(check).returncode == 1, 30, "unhealthy without a broker", interval=1)
        assert service.alive()
    finally:
        service.kill()
