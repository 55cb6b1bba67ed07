"""deploy/prometheus/ with Debian's Prometheus: `promtool` checks the scrape configs and the alert
rules and runs the rules' unit tests (deploy/prometheus/rules/edgefleet-alerts.test.yml); then a real
Prometheus server, on a copy of the compose scrape config pointed at a running inference service,
scrapes it while frames flow, and every Grafana query about inference (deploy/grafana/) evaluates on
it and returns that device's series, and every alert rule evaluates on the real series without an
error and without firing for a healthy device. tests/unit/test_metric_names.py checks the names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from edgefleet import photos
from edgefleet.ports import free_port, wait_listening
from shared import metrics
from tests import promql
from tests.support import wait_until

SCRAPE_S = 1  # the test's scrape and rule interval: seconds, not the shipped 15 s
# The dashboard's variables as Grafana fills them over this test's few seconds of data.
RATE_INTERVAL = "1m"
RANGE = "1m"


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        message = f"{name} is not installed (Debian's prometheus package, which scripts/test-tools.sh installs)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)


# ---------------------------------------------------------------------------------------------------
# promtool


def test_promtool_accepts_the_compose_scrape_config_and_its_rules():
    result = promtool("check", "config", promql.SCRAPE_CONFIGS[0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_k3s_scrape_config(tmp_path):
    """Debian builds Prometheus without Kubernetes discovery: where promtool refuses the file for that
    alone, the same file with static targets in place of kubernetes_sd_configs (relabelling and all) passes."""
    k3s = promql.SCRAPE_CONFIGS[1]
    shutil.copytree(promql.PROMETHEUS / "rules", tmp_path / "rules")
    result = promtool("check", "config", k3s)
    if result.returncode != 0:
        assert "field kubernetes_sd_configs not found" in result.stdout + result.stderr, result.stdout + result.stderr
    config = yaml.safe_load(k3s.read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {
            "names": ["edgefleet-edge", "edgefleet-cloud"]}}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9101"]}]
    static = tmp_path / "prometheus-k3s.yml"
    static.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", static)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", promql.RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(promql.rules())} rules found" in result.stdout


def test_the_alert_rules_pass_their_unit_tests():
    result = promtool("test", "rules", promql.RULE_TESTS.name, cwd=promql.RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert is tested firing (its name in an alert_rule_test with an expected alert).
    tested = {case["alertname"] for test in yaml.safe_load(promql.RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule.name for rule in promql.rules()}


def test_a_rule_that_fires_for_a_healthy_device_fails_its_unit_test(tmp_path):
    """The unit tests have teeth: the drift rule widened to any open alert also fires for a device
    whose only open alert is a latency one, and promtool says so."""
    rules = promql.RULES.read_text()
    assert rules.count('type=~".*_drift"') == 1
    (tmp_path / promql.RULES.name).write_text(rules.replace('type=~".*_drift"', 'type=~".+"'))
    shutil.copy(promql.RULE_TESTS, tmp_path)
    result = promtool("test", "rules", promql.RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "EdgefleetDriftAlertOpen" in result.stdout + result.stderr and "dev-slow" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# A real Prometheus scraping a real service


class PrometheusServer:
    """/usr/bin/prometheus on a loopback port with its own data folder; its HTTP API for queries.

    Args:
        config: the scrape config file it runs.
        folder: where its data and log go.
    """

    def __init__(self, config: Path, folder: Path) -> None:
        self.port = free_port()
        self.log_path = folder / "prometheus.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 our loopback http server
                return json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error in its body
            return json.load(exc)

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr, time=f"{time.time():.3f}")
        assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
        assert answer["data"]["resultType"] == "vector", expr
        return answer["data"]["result"]

    def ready(self) -> bool:
        """Whether it serves queries (it answers 503 while its storage opens); True once it has exited too."""
        if self.proc.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",  # noqa: S310 loopback http
                                        timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def prometheus(config: Path, folder: Path) -> Iterator[PrometheusServer]:
    server = PrometheusServer(config, folder)
    try:
        wait_listening(server.proc, server.port, 30, "prometheus")
        wait_until(server.ready, 30, "prometheus to be ready", interval=0.2)
        assert server.proc.poll() is None, "prometheus exited"
        yield server
    except BaseException:
        print(f"--- {server.log_path}\n{server.log()[-3000:]}")
        raise
    finally:
        server.stop()


def scrape_config_for(port: int, folder: Path) -> Path:
    """The shipped compose scrape config, its inference job pointed at `port`, scraping every second,
    with the shipped rules; the other jobs left out (nothing runs them here)."""
    config = yaml.safe_load(promql.SCRAPE_CONFIGS[0].read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
                            evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str((promql.SCRAPE_CONFIGS[0].parent / f).resolve()) for f in config["rule_files"]]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "edgefleet-inference")
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9101"]}]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config["scrape_configs"] = [job]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


# What a served model's inference service exposes whatever its cameras and plugins (and so what the
# test below must see scraped, or the queries it picks would be too few to mean anything).
INFERENCE_FAMILIES = {metrics.FRAMES_RECEIVED, metrics.FRAMES_REJECTED, metrics.PREDICTIONS, metrics.QUEUE_DEPTH,
                      metrics.BATCHES, f"{metrics.MODEL_INFO}_info", metrics.PROVIDER_FALLBACK,
                      f"{metrics.SERVICE_INFO}_info", metrics.BROKER_CONNECTED, metrics.STATUS_TIMESTAMP,
                      *(f"{h}_bucket" for h in (metrics.QUEUE_SECONDS, metrics.DECODE_SECONDS, metrics.MODEL_SECONDS,
                                                metrics.TOTAL_SECONDS))}


def predictions_seen(server: PrometheusServer, device_id: str) -> float:
    result = server.query(f'sum(edgefleet_predictions_total{{device="{device_id}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def test_a_real_prometheus_scrapes_inference_and_the_dashboards_queries_and_the_rules_evaluate(
        broker, start_inference, tmp_path):
    metrics_port = free_port()
    service, device = start_inference(broker, metrics_port=metrics_port)
    with prometheus(scrape_config_for(metrics_port, tmp_path), tmp_path) as server:
        wait_until(lambda: server.query('up{job="edgefleet-inference"} == 1'), 30, "a first scrape of inference")
        # Frames from two cameras in two waves, each seen by Prometheus, so that each camera's
        # counters have a first sample to grow from (a series appears with its camera's first frame);
        # one undecodable frame, so a rejection is counted too.
        for wave, total in ((range(1), 2), (range(1, 3), 6)):
            for i in wave:
                for camera in ("cam-1", "cam-2"):
                    device.publish_envelope(camera, f"{camera}-{i}", photos.jpeg("chelsea"))
            device.prediction_for(f"cam-2-{wave[-1]}")
            wait_until(lambda n=total: predictions_seen(server, device.device_id) >= n, 30,
                       f"Prometheus to see {total} predictions")
        device.publish_frame("cam-1", b"no frame at all")
        device.error_for("cam-1")
        wait_until(lambda: server.query(f'edgefleet_frames_rejected_total{{device="{device.device_id}"}}'), 30,
                   "Prometheus to see the rejection")
        time.sleep(2 * SCRAPE_S)  # a scrape past the last counts: rate() has two points of the same value too

        scraped = {s["__name__"] for s in server.api("series", **{"match[]": '{job="edgefleet-inference"}'})["data"]}
        assert INFERENCE_FAMILIES <= scraped, INFERENCE_FAMILIES - scraped
        about_inference = [q for q in promql.queries(promql.dashboard())
                           if promql.metric_names(q.expr) <= scraped | {"up"}]
        assert len(about_inference) >= 15
        for query in about_inference:
            expr = promql.substitute(query.expr, device.device_id, RATE_INTERVAL, RANGE)
            result = server.query(expr)
            assert result, f"panel {query.panel!r} {query.ref_id}: no series for {expr}"
            devices = {s["metric"].get("device", device.device_id) for s in result}
            assert devices == {device.device_id}, f"{expr}: {devices}"

        per_camera = server.query(promql.substitute(next(
            q.expr for q in about_inference if q.panel == "Predictions per second, by camera"),
            device.device_id, RATE_INTERVAL, RANGE))
        assert {s["metric"]["camera"] for s in per_camera} == {"cam-1", "cam-2"}
        assert all(float(s["value"][1]) > 0 for s in per_camera), per_camera
        p95 = server.query(f'histogram_quantile(0.95, sum by (le) (rate(edgefleet_inference_total_seconds_bucket'
                           f'{{device="{device.device_id}"}}[{RATE_INTERVAL}])))')
        assert 0 < float(p95[0]["value"][1]) <= max(metrics.LATENCY_BUCKETS_S)

        # Every rule has evaluated on the real series without an error, and a healthy device fires none.
        groups = server.api("rules")["data"]["groups"]
        evaluated = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(evaluated) == {rule.name for rule in promql.rules()}
        assert all(r["health"] == "ok" and not r.get("lastError") for r in evaluated.values()), evaluated
        assert all(r["lastEvaluation"] != "0001-01-01T00:00:00Z" for r in evaluated.values())
        assert server.api("alerts")["data"]["alerts"] == []
    assert service.alive()
