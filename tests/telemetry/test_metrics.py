"""auditor.telemetry.metrics: values recorded through the helpers come out of the real text exposition
with exact counts and sums, label values stay bounded, the queue depth is read from a real
Redis at scrape time, and multiprocess mode aggregates real separate processes.

Each test records under its own model label, so exact values hold whatever else this pytest
process recorded before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from auditor.telemetry import metrics
from support.prometheus_harness import free_port, python_process

REPO = Path(__file__).resolve().parents[2]
# Every label any auditor_* series may carry (DESIGN.md: concept, layer, model; plus small
# fixed enumerations; `le` is the histogram bucket bound).
ALLOWED_LABELS = {"concept", "layer", "model", "kind", "status", "direction", "queue", "le"}
FORBIDDEN_LABELS = {"request_id", "id", "request", "prompt", "text", "completion", "user", "job_id", "trace_id"}

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape() -> Samples:
    return parse(generate_latest(metrics.exposition_registry()).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def model() -> str:
    return f"test-model-{uuid.uuid4().hex[:8]}"


# ---- values in, exposition out ----


def test_requests_latency_and_tokens_are_exact(model):
    metrics.record_request("chat", "done", model, latency=1.5, prompt_tokens=10, completion_tokens=7)
    metrics.record_request("chat", "done", model, latency=0.25, prompt_tokens=4, completion_tokens=3)
    metrics.record_request("audit", "failed", model, latency=None, prompt_tokens=5)
    s = scrape()
    assert value(s, "auditor_requests_total", kind="chat", status="done", model=model) == 2
    assert value(s, "auditor_requests_total", kind="audit", status="failed", model=model) == 1
    assert value(s, "auditor_request_latency_seconds_count", kind="chat", model=model) == 2
    assert value(s, "auditor_request_latency_seconds_sum", kind="chat", model=model) == pytest.approx(1.75)
    assert value(s, "auditor_request_latency_seconds_bucket", kind="chat", model=model, le="0.25") == 1
    assert value(s, "auditor_request_latency_seconds_bucket", kind="chat", model=model, le="1.0") == 1
    assert value(s, "auditor_request_latency_seconds_bucket", kind="chat", model=model, le="2.5") == 2
    # no latency given: counted, not observed
    assert value(s, "auditor_request_latency_seconds_count", kind="audit", model=model) is None
    assert value(s, "auditor_tokens_total", direction="prompt", model=model) == 19
    assert value(s, "auditor_tokens_total", direction="completion", model=model) == 10


def test_scores_fill_buckets_and_count_a_concept_once_per_request(model):
    metrics.record_scores(
        model,
        [
            metrics.ScoreSample("pessimism", 15, 2.7, exceeded=True),
            metrics.ScoreSample("pessimism", 16, 3.4, exceeded=True),  # same request: still one
            metrics.ScoreSample("formality", 15, -0.3),
            metrics.ScoreSample("hedging", 15, None),  # not calibrated yet: not observed
            metrics.ScoreSample("urgency", 15, float("nan")),
        ],
    )
    metrics.record_scores(model, [metrics.ScoreSample("pessimism", 15, 9.5, exceeded=True)])
    s = scrape()
    assert value(s, "auditor_concept_threshold_exceeded_total", concept="pessimism", model=model) == 2
    assert value(s, "auditor_concept_threshold_exceeded_total", concept="formality", model=model) is None
    assert value(s, "auditor_concept_score_count", concept="pessimism", layer="15", model=model) == 2
    # negative buckets: prometheus_client serves no _sum (dashboards must not use it)
    assert value(s, "auditor_concept_score_sum", concept="pessimism", layer="15", model=model) is None
    assert value(s, "auditor_concept_score_bucket", concept="pessimism", layer="15", model=model, le="2.5") == 0
    assert value(s, "auditor_concept_score_bucket", concept="pessimism", layer="15", model=model, le="3.0") == 1
    assert value(s, "auditor_concept_score_bucket", concept="pessimism", layer="15", model=model, le="8.0") == 1
    assert value(s, "auditor_concept_score_bucket", concept="pessimism", layer="15", model=model, le="+Inf") == 2
    assert value(s, "auditor_concept_score_bucket", concept="formality", layer="15", model=model, le="0.0") == 1
    assert value(s, "auditor_concept_score_bucket", concept="formality", layer="15", model=model, le="-0.5") == 0
    assert value(s, "auditor_concept_score_count", concept="hedging", layer="15", model=model) is None
    assert value(s, "auditor_concept_score_count", concept="urgency", layer="15", model=model) is None


def test_flags_drift_model_load_worker_up_and_batches(model):
    before = scrape()
    metrics.record_flag("hidden", "pessimism", model)
    metrics.record_flag("hidden", "pessimism", model, count=2)
    metrics.record_flag("surface", "pessimism", model)
    metrics.set_drift("pessimism", 15, model, 0.12)
    metrics.set_drift("pessimism", 15, model, 0.31)  # a gauge: the last value stands
    metrics.set_model_loaded(model, 3.25)
    metrics.set_worker_up(model)
    for rows in (1, 3, 3, 16):
        metrics.observe_batch(rows)
    metrics.observe_batch(0)  # an empty step is not a batch
    s = scrape()
    assert value(s, "auditor_flags_total", kind="hidden", concept="pessimism", model=model) == 3
    assert value(s, "auditor_flags_total", kind="surface", concept="pessimism", model=model) == 1
    assert value(s, "auditor_drift_psi", concept="pessimism", layer="15", model=model) == 0.31
    assert value(s, "auditor_model_load_seconds", model=model) == 3.25
    assert value(s, "auditor_worker_up", model=model) == 1
    assert value(s, "auditor_batch_rows_count") - value(before, "auditor_batch_rows_count") == 4
    assert value(s, "auditor_batch_rows_sum") - value(before, "auditor_batch_rows_sum") == 23
    assert value(s, "auditor_batch_rows_bucket", le="4.0") - value(before, "auditor_batch_rows_bucket", le="4.0") == 3
    metrics.set_worker_up(model, up=False)
    assert value(scrape(), "auditor_worker_up", model=model) == 0


# ---- bounded labels ----


def test_unexpected_values_collapse_into_bounded_labels(model):
    for i in range(50):  # 50 made-up kinds/statuses/flag kinds -> one "other" series each
        metrics.record_request(f"kind-{i}", f"status-{i}", model)
        metrics.record_flag(f"flag-{i}", "pessimism", model)
    s = scrape()
    assert value(s, "auditor_requests_total", kind="other", status="other", model=model) == 50
    assert value(s, "auditor_flags_total", kind="other", concept="pessimism", model=model) == 50
    ours = [key for key in s if ("model", model) in key[1]]
    assert len(ours) == 2


def test_free_form_values_are_sanitised_and_cut():
    assert metrics.label_value("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metrics.label_value('a "quoted"\nvalue{x}') == "a__quoted__value_x_"
    assert metrics.label_value("") == "unknown"
    assert len(metrics.label_value("x" * 5000)) == 128
    assert metrics.label_value(15) == "15"


def test_no_family_carries_a_request_id_or_free_text_label(model):
    # Fill every family, then look at everything the exposition serves.
    metrics.record_request("chat", "done", model, 1.0, 3, 4)
    metrics.record_scores(model, [metrics.ScoreSample("pessimism", 15, 1.0, True)])
    metrics.record_flag("hidden", "pessimism", model)
    metrics.set_drift("pessimism", 15, model, 0.1)
    metrics.set_model_loaded(model, 1.0)
    metrics.set_worker_up(model)
    metrics.observe_batch(2)
    families = list(text_string_to_metric_families(generate_latest(metrics.exposition_registry()).decode()))
    auditor_families = {f.name for f in families if f.name.startswith("auditor_")}
    assert auditor_families >= {
        "auditor_requests",
        "auditor_request_latency_seconds",
        "auditor_tokens",
        "auditor_concept_score",
        "auditor_concept_threshold_exceeded",
        "auditor_flags",
        "auditor_worker_up",
        "auditor_model_load_seconds",
        "auditor_drift_psi",
        "auditor_batch_rows",
    }
    for family in families:
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), (sample.name, sample.labels)
            if family.name.startswith("auditor_"):
                assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_exported_series_lists_what_the_exposition_serves(model):
    metrics.record_request("chat", "done", model, 1.0, 3, 4)
    metrics.record_scores(model, [metrics.ScoreSample("pessimism", 15, 1.0, True)])
    metrics.record_flag("hidden", "pessimism", model)
    metrics.set_drift("pessimism", 15, model, 0.1)
    metrics.set_model_loaded(model, 1.0)
    metrics.set_worker_up(model)
    metrics.observe_batch(2)
    declared = metrics.exported_series()
    served = {
        (name, labels) for name, labels in scrape() if name.startswith("auditor_") and name != "auditor_queue_depth"
    }
    assert {name for name, _ in served} == set(declared) - {"auditor_queue_depth"}
    for name, labels in served:
        assert {key for key, _ in labels} == declared[name], name


def test_names_follow_the_design_conventions():
    """auditor_<noun>_<unit>; counters end in _total and nothing else does."""
    every = metrics.get_metrics().all()  # defined on first use: define them all before reading
    checked = 0
    for family in metrics.REGISTRY.collect():
        if not family.name.startswith("auditor_"):
            continue
        checked += 1
        assert family.name.islower() and " " not in family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
    assert checked >= len(every), (checked, len(every))  # every metric was looked at


def test_enumerations_match_the_database_models():
    from auditor.db import models

    assert metrics.FLAG_KINDS == models.FLAG_KINDS
    assert metrics.REQUEST_KINDS == models.REQUEST_KINDS
    assert set(metrics.DIVERGENCE_FLAG_KINDS) <= set(models.FLAG_KINDS)


# ---- exposition endpoints ----


def test_asgi_app_serves_the_exposition_at_exactly_metrics(model):
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    metrics.record_request("completion", "done", model, 0.5)
    app = FastAPI()
    app.add_route("/metrics", metrics.metrics_asgi_app(), include_in_schema=False)
    with TestClient(app) as client:
        response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert value(parse(response.text), "auditor_requests_total", kind="completion", status="done", model=model) == 1


def test_worker_server_serves_over_http_and_a_taken_port_is_a_warning(model, caplog):
    metrics.record_request("chat", "done", model, 2.0)
    port = free_port()
    server = metrics.start_worker_metrics_server(port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            s = parse(response.read().decode())
        assert value(s, "auditor_requests_total", kind="chat", status="done", model=model) == 1
        assert metrics.start_worker_metrics_server(port, addr="127.0.0.1") is None
        assert "not started" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


# ---- queue depth from the broker ----


def redis_url() -> str:
    # db 15 and a queue name of our own: nothing touches a real `celery` queue.
    url = os.environ.get("AUDITOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except Exception as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    return url


def depth_samples(collector: metrics.QueueDepthCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    s = parse(generate_latest(registry).decode())
    return {dict(labels)["queue"]: v for (name, labels), v in s.items() if name == "auditor_queue_depth"}


def test_queue_depth_is_read_from_redis_at_scrape_time():
    import redis

    url = redis_url()
    queue = f"auditor-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    collector = metrics.QueueDepthCollector(url, queues=[queue, f"{queue}-empty"])
    try:
        assert depth_samples(collector) == {queue: 0, f"{queue}-empty": 0}
        client.lpush(queue, "t1", "t2", "t3")
        client.lpush(f"{queue}\x06\x166", "high-priority")  # kombu's list for priority 6
        assert depth_samples(collector) == {queue: 4, f"{queue}-empty": 0}
    finally:
        client.delete(queue, f"{queue}\x06\x166")


def test_queue_depth_is_absent_not_an_error_when_the_broker_is_away():
    closed = free_port()  # nothing listens: refused at once
    assert depth_samples(metrics.QueueDepthCollector(f"redis://127.0.0.1:{closed}/0")) == {}
    # Accepts connections (the kernel's backlog) but never answers: bounded by the timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        assert depth_samples(metrics.QueueDepthCollector(url, timeout=0.3)) == {}
        assert time.monotonic() - started < 2.0


def test_only_redis_brokers_get_a_queue_depth():
    assert metrics.register_queue_depth(None) is False
    assert metrics.register_queue_depth("amqp://guest@localhost//") is False


# ---- multiprocess mode: real processes, one directory ----

RECORDER = """
import sys, time
from auditor.telemetry import metrics
n, load_seconds, psi = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
for i in range(n):
    metrics.record_request("chat", "done", "m", latency=0.5, prompt_tokens=10, completion_tokens=2)
metrics.record_scores("m", [metrics.ScoreSample("pessimism", 15, 3.0, exceeded=True)])
metrics.set_worker_up("m")
metrics.set_model_loaded("m", load_seconds)
metrics.set_drift("pessimism", 15, "m", psi)
"""
SERVER = (
    RECORDER
    + """
server = metrics.start_worker_metrics_server(int(sys.argv[4]), addr="127.0.0.1")
print("ready", flush=True)
sys.stdin.readline()  # serve until the test closes our stdin
"""
)


def record_in_subprocess(env: dict, *args: object) -> int:
    """Run RECORDER in a fresh interpreter to completion; -> its pid."""
    process = subprocess.Popen([sys.executable, "-c", RECORDER, *map(str, args)], env=env, cwd=REPO)
    assert process.wait(timeout=60) == 0
    return process.pid


def get_samples(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def test_multiprocess_mode_aggregates_separate_processes(tmp_path):
    env = {**os.environ, metrics.MULTIPROC_DIR_ENV: str(tmp_path / "prom")}  # created on import
    first_pid = record_in_subprocess(env, 4, 5.0, 0.10)
    port = free_port()
    with python_process(SERVER, 3, 2.0, 0.30, port, env=env):
        s = get_samples(port)
        # counters and histograms add up over both processes
        assert value(s, "auditor_requests_total", kind="chat", status="done", model="m") == 7
        assert value(s, "auditor_tokens_total", direction="prompt", model="m") == 70
        assert value(s, "auditor_request_latency_seconds_count", kind="chat", model="m") == 7
        assert value(s, "auditor_request_latency_seconds_sum", kind="chat", model="m") == pytest.approx(3.5)
        assert value(s, "auditor_concept_threshold_exceeded_total", concept="pessimism", model="m") == 2
        # gauges combine per their mode: livesum, livemax, mostrecent (the server wrote last)
        assert value(s, "auditor_worker_up", model="m") == 2
        assert value(s, "auditor_model_load_seconds", model="m") == 5.0
        assert value(s, "auditor_drift_psi", concept="pessimism", layer="15", model="m") == pytest.approx(0.30)

        # The first process is gone: its live gauges go, its totals stay.
        metrics.mark_process_dead(first_pid, path=env[metrics.MULTIPROC_DIR_ENV])
        s = get_samples(port)
        assert value(s, "auditor_worker_up", model="m") == 1
        assert value(s, "auditor_model_load_seconds", model="m") == 2.0
        assert value(s, "auditor_requests_total", kind="chat", status="done", model="m") == 7


def test_multiprocess_files_read_back_by_any_process(tmp_path):
    """The directory alone is the state: a process that recorded nothing (here: the test,
    reading with MultiProcessCollector) sees the same totals."""
    directory = tmp_path / "prom"
    env = {**os.environ, metrics.MULTIPROC_DIR_ENV: str(directory)}
    for n in (2, 5):
        record_in_subprocess(env, n, 1.0, 0.05)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    s = parse(generate_latest(registry).decode())
    assert value(s, "auditor_requests_total", kind="chat", status="done", model="m") == 7
    assert value(s, "auditor_concept_score_count", concept="pessimism", layer="15", model="m") == 2
