"""The PromQL that deploy/ ships, read as the tests need it: every alert rule's expression
(deploy/prometheus/rules/), every Grafana panel's query (deploy/grafana/), and the metric names an
expression reads. Pure parsing, no Prometheus: tests/unit/test_metric_names.py checks the names
against shared/metrics.py, tests/test_prometheus.py runs the queries on a real server."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "edgefleet-alerts.yml"
RULE_TESTS = PROMETHEUS / "rules" / "edgefleet-alerts.test.yml"
SCRAPE_CONFIGS = (PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus-k3s.yml")
DASHBOARD = REPO / "deploy" / "grafana" / "edgefleet-dashboard.json"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_TEMPLATE_VARS = re.compile(r"\$\{?\w+(?::\w+)?\}?")
# An identifier not glued to a number (1e3, 0.5) and not a function call.
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (selectors' names; not functions, labels or keywords).

    Args:
        expr: PromQL, possibly holding Grafana variables ($device, ${datasource}, $__rate_interval).

    Returns:
        The names, e.g. {"edgefleet_inference_total_seconds_bucket"} for a histogram_quantile over it.
    """
    text = _STRINGS.sub('""', expr)
    text = _TEMPLATE_VARS.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _OFFSET.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


@dataclass(frozen=True)
class Rule:
    group: str
    name: str  # the alert's (or recording rule's) name
    expr: str


def rules(path: Path = RULES) -> list[Rule]:
    doc = yaml.safe_load(path.read_text())
    return [Rule(g["name"], r.get("alert") or r["record"], str(r["expr"])) for g in doc["groups"] for r in g["rules"]]


def dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def all_panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in board.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


@dataclass(frozen=True)
class Query:
    panel_id: int
    panel: str  # its title
    ref_id: str
    expr: str


def queries(board: dict) -> list[Query]:
    """Every panel target's PromQL."""
    return [Query(p["id"], p.get("title", ""), t["refId"], t["expr"])
            for p in all_panels(board) for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str, device: str, rate_interval: str, range_: str) -> str:
    """The expression as Grafana sends it for one device: its variables filled in.

    Args:
        expr: a panel's query.
        device: the `device` variable's value.
        rate_interval: what $__rate_interval becomes (four scrape intervals, in Grafana).
        range_: what $__range becomes (the dashboard's time range).
    """
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("${device}", device).replace("$device", device))
