"""The Grafana dashboards (deploy/grafana/dashboards/*.json) stay valid: every query names only
metrics and labels that auditor/telemetry/metrics.py exports, every datasource is the provisioned one,
panel ids are unique and panels do not overlap, every template variable used is defined, and
(when Prometheus is installed) a real Prometheus parses every query."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from auditor.telemetry.metrics import exported_series
from support.prometheus_harness import PROMETHEUS, SKIP_REASON, PrometheusError, start_prometheus
from support.prometheus_harness import series_references as references

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# Series a dashboard may use besides Auditor's own: Prometheus' scrape health and its alerts.
PROMETHEUS_SERIES = {"up": frozenset({"job", "instance"}), "ALERTS": frozenset({"alertname", "alertstate", "severity"})}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
_VARIABLE = re.compile(r"\$\{?(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.S)


def series_catalogue() -> dict[str, frozenset[str]]:
    return {**exported_series(), **PROMETHEUS_SERIES}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"{dashboard['uid']} panel {panel['id']} ({panel.get('title')}) {target.get('refId')}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        out.append((variable["name"], query["query"] if isinstance(query, dict) else query))
    return out


def provisioned_datasource_uid() -> str:
    provisioning = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = provisioning["datasources"]
    return datasource["uid"]


def test_the_two_dashboards_exist_with_unique_uids():
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert {"auditor-overview", "auditor-concepts"} <= set(uids)
    assert len(uids) == len(set(uids))


def test_reference_extraction_finds_what_it_should():
    # the checker itself: it must see every metric, matcher label and nothing else
    expr = (
        "histogram_quantile(0.99, sum by (le, kind) (rate(auditor_request_latency_seconds_bucket"
        '{model=~"$model"}[$__rate_interval]))) / scalar(sum(rate(auditor_requests_total[5m]))) or vector(0)'
    )
    assert references(expr) == [
        ("auditor_request_latency_seconds_bucket", {"model"}),
        ("auditor_requests_total", set()),
    ]
    assert references('auditor_made_up_total{job="x"} > 1') == [("auditor_made_up_total", {"job"})]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_use_only_exported_metrics_and_their_labels(path):
    catalogue = series_catalogue()
    dashboard = load(path)
    checked = 0
    for where, expr in queries(dashboard):
        for name, labels in references(expr):
            assert name in catalogue, f"{where}: {name} is not exported by auditor/telemetry/metrics.py"
            unknown = labels - catalogue[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
            checked += 1
    for name, query in variable_queries(dashboard):
        match = _LABEL_VALUES.match(query)
        assert match, f"variable {name}: expected label_values(<selector>, <label>), got {query!r}"
        selector, label = match.groups()
        ((metric, labels),) = references(selector)
        assert metric in catalogue and label in catalogue[metric], f"variable {name}: {metric} has no label {label}"
        assert labels <= catalogue[metric], f"variable {name}: {labels - catalogue[metric]}"
    assert checked >= 8, "suspiciously few metric references"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_datasource_is_the_provisioned_prometheus(path):
    uid = provisioned_datasource_uid()
    dashboard = load(path)
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panel_ids_are_unique_and_the_grid_has_no_overlap(path):
    dashboard = load(path)
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_variable_used_is_defined(path):
    dashboard = load(path)
    defined = {variable["name"] for variable in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    texts = [expr for _, expr in queries(dashboard)] + [q for _, q in variable_queries(dashboard)]
    texts += [panel.get("title", "") for panel in all_panels(dashboard)]
    texts += [panel["repeat"] for panel in all_panels(dashboard) if panel.get("repeat")]
    for text in texts:
        for name in _VARIABLE.findall(text):
            assert name in defined, f"${name} used in {text!r} but not defined"
    for panel in all_panels(dashboard):
        if panel.get("repeat"):
            assert panel["repeat"] in defined


def test_concepts_dashboard_has_a_concept_variable_and_per_concept_heatmap():
    dashboard = load(GRAFANA / "dashboards" / "auditor-concepts.json")
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["concept"]["multi"] and variables["concept"]["includeAll"]
    (heatmap,) = [panel for panel in all_panels(dashboard) if panel["type"] == "heatmap"]
    assert heatmap["repeat"] == "concept"
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "auditor_concept_score_bucket" in heatmap["targets"][0]["expr"]


# ---- a real Prometheus parses every query ----

# Values a Grafana user could pick, substituted the way Grafana does before sending a query.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
    "$concept": "pessimism|formality",
    "$layer": ".*",
}


def substitute(expr: str) -> str:
    for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(variable, SUBSTITUTIONS[variable])
    return expr


@pytest.mark.skipif(PROMETHEUS is None, reason=SKIP_REASON)
@pytest.mark.timeout(60)
def test_prometheus_parses_every_dashboard_query(tmp_path):
    exprs = [(where, substitute(expr)) for path in DASHBOARDS for where, expr in queries(load(path))]
    for path in DASHBOARDS:
        for name, query in variable_queries(load(path)):
            selector = _LABEL_VALUES.match(query).group(1)
            exprs.append((f"{path.name} variable {name}", substitute(selector)))
    with start_prometheus(tmp_path, jobs={}) as prometheus:
        failures = []
        for where, expr in exprs:
            try:
                prometheus.query(expr)
            except PrometheusError as exc:
                failures.append(f"{where}: {exc}")
        assert not failures, "\n".join(failures)
