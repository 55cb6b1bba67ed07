"""The metric names deploy/ queries are the ones the services expose: every name an alert rule
(deploy/prometheus/rules/) or a Grafana panel (deploy/grafana/) reads is a family of shared/metrics.py,
under the name a scrape shows it by (a histogram's _bucket/_sum/_count, an Info's _info), or one
Prometheus makes itself (`up`). And the dashboard is a well-formed Grafana model. Pure parsing: the
queries run on a real Prometheus in tests/test_prometheus.py."""

from __future__ import annotations

import json

import pytest
import yaml

from shared import metrics
from tests import promql

# Series Prometheus makes for every target, not the services.
PROMETHEUS_SERIES = {"up"}


def exposed_names() -> set[str]:
    """Every name a scrape of an edgefleet service can show, from the contract."""
    names = {name for name in metrics.ALL if name not in metrics.HISTOGRAMS and name not in metrics.INFOS}
    names |= {f"{name}{suffix}" for name in metrics.HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    names |= {f"{name}_info" for name in metrics.INFOS}
    return names


def unknown(expr: str) -> set[str]:
    return promql.metric_names(expr) - exposed_names() - PROMETHEUS_SERIES


def test_the_parser_finds_the_metric_names_and_nothing_else():
    expr = ('histogram_quantile(0.95, sum by (device, le) (rate(edgefleet_inference_total_seconds_bucket'
            '{device="$device", camera=~"cam.*"}[$__rate_interval]))) > 1e3 and on(device) '
            'max without (job) (edgefleet_provider_fallback offset 5m) == bool 1 or time() - up')
    assert promql.metric_names(expr) == {"edgefleet_inference_total_seconds_bucket", "edgefleet_provider_fallback",
                                         "up"}
    assert promql.metric_names('sum(rate(edgefleet_predictions_total{reason="and or by"}[5m:1m]))') == {
        "edgefleet_predictions_total"}


def test_a_wrong_name_is_caught():
    assert unknown("rate(edgefleet_predictions_total[5m])") == set()
    assert unknown("rate(edgefleet_prediction_total[5m])") == {"edgefleet_prediction_total"}  # a typo
    assert unknown("edgefleet_predictions_total_bucket") == {"edgefleet_predictions_total_bucket"}  # no histogram
    assert unknown("edgefleet_model") == {"edgefleet_model"}  # an Info is read as edgefleet_model_info
    assert unknown("edgefleet_model_info") == set()


def test_every_alert_rule_reads_only_families_of_the_contract():
    rules = promql.rules()
    assert len(rules) >= 5
    for rule in rules:
        names = promql.metric_names(rule.expr)
        assert names, f"{rule.name} reads no metric"
        assert unknown(rule.expr) == set(), f"{rule.name}: {rule.expr}"


def test_the_alerts_the_issue_asks_for_exist():
    """Drift, stale devices, outbox growth, provider fallback, ingest dead letters: each has a rule on its family."""
    read = {name for rule in promql.rules() for name in promql.metric_names(rule.expr)}
    assert {metrics.DRIFT_SCORE, metrics.ALERTS_OPEN, metrics.STATUS_TIMESTAMP, "up", metrics.OUTBOX_RECORDS,
            metrics.OUTBOX_OLDEST_AGE, metrics.PROVIDER_FALLBACK, metrics.INGEST_BATCHES} <= read


def test_every_dashboard_query_reads_only_families_of_the_contract():
    queries = promql.queries(promql.dashboard())
    assert len(queries) >= 20
    for query in queries:
        assert promql.metric_names(query.expr), f"panel {query.panel!r} {query.ref_id} reads no metric"
        assert unknown(query.expr) == set(), f"panel {query.panel!r} {query.ref_id}: {query.expr}"


def test_the_dashboard_charts_what_the_issue_names():
    read = {name for q in promql.queries(promql.dashboard()) for name in promql.metric_names(q.expr)}
    wanted = {metrics.PREDICTIONS, metrics.FRAMES_DROPPED, metrics.OUTBOX_RECORDS, metrics.OUTBOX_OLDEST_AGE,
              metrics.DRIFT_SCORE, metrics.SYNC_STATE, metrics.PROVIDER_FALLBACK, f"{metrics.MODEL_INFO}_info"}
    wanted |= {f"{name}_bucket" for name in (metrics.QUEUE_SECONDS, metrics.DECODE_SECONDS, metrics.MODEL_SECONDS,
                                             metrics.TOTAL_SECONDS)}
    assert wanted <= read, wanted - read
    exprs = [q.expr for q in promql.queries(promql.dashboard())]
    assert any("histogram_quantile(0.5," in e for e in exprs) and any("histogram_quantile(0.95," in e for e in exprs)


def test_the_dashboard_is_a_well_formed_grafana_model():
    board = json.loads(promql.DASHBOARD.read_text())
    panels = promql.all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert isinstance(board["schemaVersion"], int) and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["device"]["type"] == "query" and "device" in variables["device"]["definition"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        # Every query goes to the datasource the variable picks: no uid of one Grafana's datasource.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t.get("datasource", panel["datasource"]) == panel["datasource"] for t in panel["targets"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_no_two_panels_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in promql.dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_device_panels_select_the_device_variable_by_its_label():
    for query in promql.queries(promql.dashboard()):
        if "$device" in query.expr:
            selectors = [s for s in query.expr.split("{")[1:]]
            assert all('device="$device"' in s.split("}")[0] for s in selectors), query.expr


@pytest.mark.parametrize("path", promql.SCRAPE_CONFIGS, ids=lambda p: p.name)
def test_the_scrape_configs_load_the_rules_file(path):
    config = yaml.safe_load(path.read_text())
    assert [(path.parent / f).resolve() for f in config["rule_files"]] == [promql.RULES.resolve()]
