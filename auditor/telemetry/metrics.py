"""Every Prometheus metric Auditor exports, defined once, and the helpers that fill them.

Names follow DESIGN.md: `auditor_<noun>_<unit>`, counters end in `_total`. Label sets are
bounded: concept, layer, model, plus small fixed enumerations (kind, status, direction, queue).
Never a request id, a prompt or other free text: every distinct label value is a time series
that Prometheus keeps for its whole retention.

Multiprocess mode: when PROMETHEUS_MULTIPROC_DIR is set in the environment (it must be set before
the process starts: prometheus_client picks its value storage when first imported), every
process writes its values to files in that directory, and whichever process serves /metrics
aggregates all of them with MultiProcessCollector. Each gauge says how processes combine
(`multiprocess_mode`). The directory must start empty for each deployment (a tmpfs in
docker-compose), or counters of a previous run are added in. Without the variable, metrics live
in prometheus_client's default registry of this process.

Callers use the `record_*` / `set_*` / `observe_*` helpers, not the metric objects, so label
values are always sanitised the same way.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_multiproc_dir = os.environ.get(MULTIPROC_DIR_ENV)
if _multiproc_dir:
    # prometheus_client creates a value file as soon as a metric without labels is defined
    # (below, at import): a missing directory would fail the import with FileNotFoundError.
    os.makedirs(_multiproc_dir, exist_ok=True)

from prometheus_client import (  # noqa: E402  # noqa: E402
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)
from prometheus_client.asgi import make_asgi_app  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

log = logging.getLogger(__name__)

# `*_created` timestamps would add one gauge series per labelled child, which Prometheus stores
# but nothing here reads; multiprocess mode never exports them, so both modes now match.
disable_created_metrics()

# ---- bounded label values ----

REQUEST_KINDS = ("chat", "completion", "audit")  # = auditor.db.models.REQUEST_KINDS (tested)
# done/failed: the worker finished or failed the request; timeout: the API stopped waiting;
# unavailable: it never reached a worker (broker down); rejected: refused before queueing.
REQUEST_STATUSES = ("done", "failed", "timeout", "unavailable", "rejected")
FLAG_KINDS = ("hidden", "surface", "threshold", "drift")  # = auditor.db.models.FLAG_KINDS (tested)
# Flags that say the output text and the residual stream disagree (the divergence alert).
DIVERGENCE_FLAG_KINDS = ("hidden", "surface")
TOKEN_DIRECTIONS = ("prompt", "completion")
OTHER = "other"  # what an unexpected enumeration value is counted as
UNKNOWN = "unknown"  # what an empty free-form value (model, concept) is counted as

LABEL_MAX_CHARS = 128
# Concept names are already [A-Za-z0-9_.-]{1,128}; model ids add "/" (HF names) and ":".
_UNSAFE_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.:/-]")


def label_value(value: object) -> str:
    """A free-form label value (model id, concept name) made safe and short.

    Characters outside [A-Za-z0-9_.:/-] become "_" and the value is cut to 128 characters, so
    a stray path or message can never mint an unbounded family of series."""
    text = _UNSAFE_LABEL_CHARS.sub("_", str(value))[:LABEL_MAX_CHARS]
    return text or UNKNOWN


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def _layer(layer: int) -> str:
    return str(int(layer))


# ---- the metrics ----

# End-to-end on CPU is seconds to minutes (generation), audits of short texts well under one.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Calibrated z of a concept score against neutral text: ~N(0, 1) when the concept is absent,
# thresholds at a 1% false-positive rate sit near 2-3, steered text reaches 5+. With negative
# buckets prometheus_client leaves out `_sum` (a sum that can fall is no counter; multiprocess
# mode still writes one): read this histogram through its buckets and `_count` only.
Z_SCORE_BUCKETS = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Rows generated together in one decode step; BATCH_MAX_SIZE is at most 256.
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "auditor_requests_total",
    "Monitored requests that ended, by kind (chat, completion, audit) and outcome.",
    ["kind", "status", "model"],
)
REQUEST_LATENCY = Histogram(
    "auditor_request_latency_seconds",
    "Seconds from a request's arrival to its end, queueing included.",
    ["kind", "model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "auditor_tokens_total",
    "Tokens processed, by direction (prompt read, completion generated or replayed).",
    ["direction", "model"],
)
CONCEPT_SCORE = Histogram(
    "auditor_concept_score",
    "Calibrated z-score of a request's mean concept score against neutral text.",
    ["concept", "layer", "model"],
    buckets=Z_SCORE_BUCKETS,
)
CONCEPT_THRESHOLD_EXCEEDED = Counter(
    "auditor_concept_threshold_exceeded_total",
    "Requests whose concept score was above the concept's calibrated alert threshold.",
    ["concept", "model"],
)
FLAGS = Counter(
    "auditor_flags_total",
    "Flags raised, by kind (hidden/surface: text and residual stream disagree; threshold; drift).",
    ["kind", "concept", "model"],
)
WORKER_UP = Gauge(
    "auditor_worker_up",
    "1 while a worker process is consuming tasks for this model.",
    ["model"],
    # Number of live worker processes; mark_process_dead() drops a dead process's value.
    multiprocess_mode="livesum",
)
MODEL_LOAD_SECONDS = Gauge(
    "auditor_model_load_seconds",
    "Seconds the last model load took in this worker process.",
    ["model"],
    multiprocess_mode="livemax",  # the slowest live process is the one worth seeing
)
DRIFT_PSI = Gauge(
    "auditor_drift_psi",
    "Population stability index of recent concept scores against the calibration reference.",
    ["concept", "layer", "model"],
    # A property of the traffic, not of a process: the latest computation wins, whoever made it.
    multiprocess_mode="mostrecent",
)
BATCH_ROWS = Histogram(
    "auditor_batch_rows",
    "Rows (requests) generated together in one decode step.",
    buckets=BATCH_ROW_BUCKETS,
)
QUEUE_DEPTH_NAME = "auditor_queue_depth"  # filled at scrape time by QueueDepthCollector
QUEUE_DEPTH_LABELS = ("queue",)

ALL_METRICS = (
    REQUESTS,
    REQUEST_LATENCY,
    TOKENS,
    CONCEPT_SCORE,
    CONCEPT_THRESHOLD_EXCEEDED,
    FLAGS,
    WORKER_UP,
    MODEL_LOAD_SECONDS,
    DRIFT_PSI,
    BATCH_ROWS,
)


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name /metrics can serve, with its label names: what dashboards and alert
    rules may reference (tests check them against this)."""
    series: dict[str, frozenset[str]] = {QUEUE_DEPTH_NAME: frozenset(QUEUE_DEPTH_LABELS)}
    for metric in ALL_METRICS:
        family = metric.describe()[0]
        labels = frozenset(metric._labelnames)
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "gauge":
            series[family.name] = labels
        else:  # histogram
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_count"] = labels
            if metric._upper_bounds[0] >= 0:  # see Z_SCORE_BUCKETS
                series[f"{family.name}_sum"] = labels
    return series


# ---- helpers the rest of the code calls ----


def record_request(
    kind: str,
    status: str,
    model: str,
    latency: float | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    """One request ended. `latency` (seconds since it arrived) is observed when known."""
    kind, model = _one_of(kind, REQUEST_KINDS), label_value(model)
    REQUESTS.labels(kind=kind, status=_one_of(status, REQUEST_STATUSES), model=model).inc()
    if latency is not None and math.isfinite(latency) and latency >= 0:
        REQUEST_LATENCY.labels(kind=kind, model=model).observe(latency)
    add_tokens(model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def add_tokens(model: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    model = label_value(model)
    if prompt_tokens > 0:
        TOKENS.labels(direction="prompt", model=model).inc(prompt_tokens)
    if completion_tokens > 0:
        TOKENS.labels(direction="completion", model=model).inc(completion_tokens)


@dataclass(frozen=True)
class ScoreSample:
    """One request's score for one concept at one layer.

    `z` is the calibrated z-score (None when the concept is not calibrated yet: not observed).
    `exceeded` is the caller's verdict against the concept's calibrated threshold, which lives
    in raw-score units next to the calibration, not here."""

    concept: str
    layer: int
    z: float | None
    exceeded: bool = False


def record_scores(model: str, samples: Iterable[ScoreSample]) -> None:
    """Observe one request's concept scores.

    Record the layers worth a time series: each concept's primary layer is enough for the
    dashboards and alerts; every monitored layer multiplies the series by the layer count.
    A concept counts as exceeded at most once per call (per request), whatever its layers say."""
    model = label_value(model)
    exceeded: set[str] = set()
    for sample in samples:
        concept = label_value(sample.concept)
        if sample.z is not None and math.isfinite(sample.z):
            CONCEPT_SCORE.labels(concept=concept, layer=_layer(sample.layer), model=model).observe(sample.z)
        if sample.exceeded:
            exceeded.add(concept)
    for concept in exceeded:
        CONCEPT_THRESHOLD_EXCEEDED.labels(concept=concept, model=model).inc()


def record_flag(kind: str, concept: str, model: str, count: int = 1) -> None:
    if count > 0:
        FLAGS.labels(kind=_one_of(kind, FLAG_KINDS), concept=label_value(concept), model=label_value(model)).inc(count)


def set_drift(concept: str, layer: int, model: str, psi: float) -> None:
    DRIFT_PSI.labels(concept=label_value(concept), layer=_layer(layer), model=label_value(model)).set(psi)


def observe_batch(rows: int) -> None:
    """Rows in the decode step just run (call once per step)."""
    if rows > 0:
        BATCH_ROWS.observe(rows)


def set_model_loaded(model: str, seconds: float) -> None:
    MODEL_LOAD_SECONDS.labels(model=label_value(model)).set(seconds)


def set_worker_up(model: str, up: bool = True) -> None:
    """Call with True when a worker starts consuming, False when it shuts down."""
    WORKER_UP.labels(model=label_value(model)).set(1 if up else 0)


# ---- queue depth, read from the broker at scrape time ----

CELERY_DEFAULT_QUEUE = "celery"
# kombu's Redis transport keeps a task sent with priority p > 0 in a sibling list named
# f"{queue}\x06\x16{p}" (steps 3, 6, 9); the backlog is the sum of the lists.
_KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


class QueueDepthCollector(Collector):
    """`auditor_queue_depth{queue}`: tasks waiting in each Celery queue on a Redis broker.

    Read with LLEN when Prometheus scrapes, so it is current and costs nothing between scrapes.
    Every Redis call is bounded by `timeout` seconds with no retries; when the broker cannot be
    read the sample is left out (absent), never an exception that would fail the whole scrape."""

    def __init__(self, broker_url: str, queues: Iterable[str] = (CELERY_DEFAULT_QUEUE,), timeout: float = 0.5):
        self.broker_url = broker_url
        self.queues = tuple(queues)
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def describe(self) -> list[GaugeMetricFamily]:
        # Lets the registry check names without calling collect() (which would touch Redis).
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        try:
            depths = self.read_depths()
        except Exception as exc:  # broker down, DNS, auth, timeout: absent, not a failed scrape
            log.debug("queue depth unavailable from the broker: %s", exc)
            depths = {}
        for queue, depth in depths.items():
            family.add_metric([label_value(queue)], depth)
        yield family

    def read_depths(self) -> dict[str, int]:
        client = self._redis()
        pipe = client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
            for step in _KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEPARATOR}{step}")
        lengths = pipe.execute()
        per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
        return {queue: int(sum(lengths[i * per_queue : (i + 1) * per_queue])) for i, queue in enumerate(self.queues)}

    def _redis(self) -> Any:
        with self._lock:
            if self._client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                # redis-py retries 3 times by default: a scrape must not wait that long.
                self._client = redis.Redis.from_url(
                    self.broker_url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry=Retry(NoBackoff(), 0),
                )
            return self._client

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(QUEUE_DEPTH_NAME, "Tasks waiting in the Celery queue on the broker.", labels=["queue"])


# ---- exposition ----

_exposition: CollectorRegistry | None = None
_queue_collector: QueueDepthCollector | None = None
_exposition_lock = threading.Lock()


def multiprocess_dir() -> str | None:
    return _multiproc_dir or None


def exposition_registry() -> CollectorRegistry:
    """What /metrics serves: every process's values in multiprocess mode, else this process's."""
    global _exposition
    with _exposition_lock:
        if _exposition is None:
            if multiprocess_dir():
                _exposition = CollectorRegistry()
                multiprocess.MultiProcessCollector(_exposition, path=multiprocess_dir())
            else:
                _exposition = REGISTRY
        return _exposition


def register_queue_depth(broker_url: str | None, queues: Iterable[str] = (CELERY_DEFAULT_QUEUE,)) -> bool:
    """Export the Celery queue depth from this process. Once per process (later calls are
    ignored); only Redis brokers (the one docker-compose uses). -> whether it is exported."""
    global _queue_collector
    if not broker_url or not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return False
    registry = exposition_registry()
    with _exposition_lock:
        if _queue_collector is None:
            _queue_collector = QueueDepthCollector(broker_url, queues)
            registry.register(_queue_collector)
    return True


class _MetricsApp:
    """An ASGI app object, not a function, so Starlette routes it as a raw ASGI app:
    `app.add_route("/metrics", ...)` then answers /metrics itself, where `app.mount("/metrics", ...)`
    answers every scrape of /metrics with a 307 redirect to /metrics/."""

    def __init__(self, inner: Any):
        self._inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._inner(scope, receive, send)


def metrics_asgi_app(broker_url: str | None = None) -> _MetricsApp:
    """An ASGI app serving the text exposition. In FastAPI:
    `app.add_route("/metrics", metrics_asgi_app(settings.broker_url), include_in_schema=False)`.
    With a Redis broker URL it also reports the Celery queue depth."""
    register_queue_depth(broker_url)
    return _MetricsApp(make_asgi_app(registry=exposition_registry()))


WORKER_METRICS_PORT = 9100


def start_worker_metrics_server(port: int = WORKER_METRICS_PORT, addr: str = "0.0.0.0", broker_url: str | None = None):
    """Serve /metrics from a background thread (Celery workers have no HTTP server of their own).

    Returns the server (call `.shutdown()` to stop it), or None when the port is taken: metrics
    are worth a warning, not a worker that refuses to start (e.g. a second worker process on
    the same host; in multiprocess mode the first one's server already reports both)."""
    register_queue_depth(broker_url)
    try:
        server, _thread = start_http_server(port, addr=addr, registry=exposition_registry())
    except OSError as exc:
        log.warning("worker metrics server not started on %s:%d: %s", addr, port, exc)
        return None
    return server


def mark_process_dead(pid: int | None = None, path: str | None = None) -> None:
    """Multiprocess mode: forget a dead process's live gauges (worker_up, model load time).
    Call from the parent when a child exits, or from a process's own shutdown hook with its
    pid. Its counters and histograms stay: they are totals. No-op without multiprocess mode."""
    path = path or multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid, path)
