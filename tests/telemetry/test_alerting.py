"""The alerting rules: promtool accepts and unit-tests them, and a real Prometheus on loopback
scrapes a worker metrics server (auditor.telemetry.metrics.start_worker_metrics_server, in its own
process, multiprocess mode) and takes rules.yml's alerts from inactive to firing when the
emitted values cross their thresholds."""

from __future__ import annotations

import os

import pytest
import yaml

from auditor.telemetry.metrics import exported_series
from support.prometheus_harness import (
    PROMETHEUS,
    PROMTOOL,
    RULES,
    RULES_TESTS,
    SKIP_REASON,
    free_port,
    promtool,
    python_process,
    rules_with_short_for,
    send,
    series_references,
    start_prometheus,
)

needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason=SKIP_REASON)

ALERTS = {
    "AuditorConceptThresholdRateHigh",
    "AuditorDivergenceFlagRateHigh",
    "AuditorConceptScoreDrift",
    "AuditorNoLiveWorker",
    "AuditorQueueBacklog",
}


@needs_prometheus
def test_promtool_checks_the_rules_and_the_scrape_config():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    config = RULES.parent / "prometheus.yml"
    result = promtool("check", "config", "--syntax-only", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_annotations_and_a_unit_test():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, rule["alert"]
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == ALERTS and silent == ALERTS  # each alert proven to fire and to hold back


def test_rules_use_only_exported_metrics_and_their_labels():
    catalogue = exported_series()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            references = series_references(rule["expr"])
            assert references, rule["alert"]
            for name, labels in references:
                assert name in catalogue, f"{rule['alert']}: {name} is not exported by auditor/telemetry/metrics.py"
                assert labels <= catalogue[name], f"{rule['alert']}: {name} has no label {labels - catalogue[name]}"


@needs_prometheus
def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# A worker's metrics as the service would emit them: 20 finished requests a second, scored
# for pessimism. Calm: one request above threshold at the start (so the series exists and its
# rate is a real 0, not a missing series), PSI 0.05. After "steer" on stdin: half of them above
# threshold and PSI 0.45, as steered traffic would look.
EMITTER = """
import sys, threading, time
from auditor.telemetry import metrics

model = "smollm2-test"
state = {"steered": False}

def commands():
    for line in sys.stdin:
        if line.strip() == "steer":
            state["steered"] = True
    state["stop"] = True  # stdin closed: the test is done

threading.Thread(target=commands, daemon=True).start()
metrics.set_worker_up(model)
metrics.set_model_loaded(model, 3.5)
server = metrics.start_worker_metrics_server(int(sys.argv[1]), addr="127.0.0.1")
print("ready", flush=True)
tick = 0
while not state.get("stop"):
    tick += 1
    steered = state["steered"]
    metrics.record_request("chat", "done", model, latency=0.8, prompt_tokens=12, completion_tokens=20)
    metrics.record_scores(model, [metrics.ScoreSample("pessimism", 15, 5.0 if steered else 0.3,
                                                      exceeded=tick == 1 or (steered and tick % 2 == 0))])
    metrics.set_drift("pessimism", 15, model, 0.45 if steered else 0.05)
    time.sleep(0.05)
"""


@needs_prometheus
@pytest.mark.timeout(60)
def test_prometheus_scrapes_a_worker_and_an_alert_fires_when_values_cross(tmp_path):
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc")}
    rules = rules_with_short_for(RULES, tmp_path / "rules.yml", hold="1s")
    with (
        python_process(EMITTER, port, env=env) as emitter,
        start_prometheus(
            tmp_path / "prometheus", {"auditor-worker": [f"127.0.0.1:{port}"]}, rule_files=[rules]
        ) as prometheus,
    ):
        (target,) = prometheus.wait_for_target_up("auditor-worker")
        assert target["lastError"] == ""
        # The service's own series, through Prometheus: scraped from the multiprocess files.
        (up,) = prometheus.query('auditor_worker_up{job="auditor-worker"}')
        assert up["metric"]["model"] == "smollm2-test" and float(up["value"][1]) == 1

        # Calm traffic: enough requests for the rules' minimum (20 in 10m), a flat exceeded
        # counter, low PSI: the expressions have data, yet no alert is even pending.
        prometheus.wait_for_evaluations(3)
        assert prometheus.query('sum(increase(auditor_requests_total{status="done"}[10m])) >= 20')
        (flat,) = prometheus.query("sum(rate(auditor_concept_threshold_exceeded_total[10m]))")
        assert float(flat["value"][1]) == 0
        assert prometheus.alerts() == []

        send(emitter, "steer")
        alert = prometheus.wait_for_alert(
            "AuditorConceptThresholdRateHigh",
            "firing",
            timeout=20,
            labels={"concept": "pessimism", "model": "smollm2-test"},
        )
        assert alert["labels"]["severity"] == "warning"
        # Over the 10m window the share climbs from 0 towards the steered 50%; it fired
        # on the way, once above the rule's 5%.
        assert 0.05 < float(alert["value"]) <= 0.6
        assert alert["annotations"]["summary"].startswith("pessimism above its alert threshold in")
        drift = prometheus.wait_for_alert(
            "AuditorConceptScoreDrift", "firing", timeout=10, labels={"concept": "pessimism", "layer": "15"}
        )
        assert float(drift["value"]) == pytest.approx(0.45)
        # Negative control: a worker is up, so the no-worker alert stays quiet throughout.
        assert prometheus.alerts("AuditorNoLiveWorker") == []
