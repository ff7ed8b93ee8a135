"""What /metrics serves and how: the registry to expose (this process's, or every process's in
multiprocess mode), the queue-depth collector beside it, the API's ASGI app and the workers' HTTP
server, and the catalogue of exported series that dashboards and alert rules are checked
against."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from prometheus_client.asgi import make_asgi_app

from auditor.telemetry.definitions import get_metrics
from auditor.telemetry.multiproc_dir import multiprocess_dir
from auditor.telemetry.queue_depth import (
    CELERY_DEFAULT_QUEUE,
    QUEUE_DEPTH_LABELS,
    QUEUE_DEPTH_NAME,
    QueueDepthCollector,
)

log = logging.getLogger(__name__)

WORKER_METRICS_PORT = 9100

_exposition: CollectorRegistry | None = None
_queue_collector: QueueDepthCollector | None = None
_exposition_lock = threading.Lock()


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name /metrics can serve, with its label names: what dashboards and alert
    rules may reference (tests check them against this)."""
    series: dict[str, frozenset[str]] = {QUEUE_DEPTH_NAME: frozenset(QUEUE_DEPTH_LABELS)}
    for metric in get_metrics().all():
        family = metric.describe()[0]
        labels = frozenset(metric._labelnames)
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "gauge":
            series[family.name] = labels
        else:  # histogram
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_count"] = labels
            if metric._upper_bounds[0] >= 0:  # see definitions.Z_SCORE_BUCKETS
                series[f"{family.name}_sum"] = labels
    return series


def exposition_registry() -> CollectorRegistry:
    """What /metrics serves: every process's values in multiprocess mode, else this process's."""
    global _exposition
    # Defines the metrics if nothing has yet: this process's registry then holds them, and in
    # multiprocess mode the directory MultiProcessCollector reads exists.
    get_metrics()
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
