"""Auditor's Prometheus metrics, as callers use them: `from auditor.telemetry import metrics`,
then `metrics.record_request(...)`, `metrics.metrics_asgi_app(...)`, and so on.

The code lives beside this module: `labels` (bounded label values), `definitions` (the metric
objects, defined on first use), `recording` (the record_* / set_* / observe_* helpers),
`multiproc_dir` (prometheus_client's multiprocess mode), `queue_depth` (the Celery queue depth,
read from Redis at scrape time) and `exposition` (what /metrics serves). Importing it records
nothing and writes no file.
"""

from prometheus_client import REGISTRY

from auditor.telemetry.definitions import (
    BATCH_ROW_BUCKETS,
    LATENCY_BUCKETS,
    Z_SCORE_BUCKETS,
    AuditorMetrics,
    get_metrics,
)
from auditor.telemetry.exposition import (
    WORKER_METRICS_PORT,
    exported_series,
    exposition_registry,
    metrics_asgi_app,
    register_queue_depth,
    start_worker_metrics_server,
)
from auditor.telemetry.labels import (
    DIVERGENCE_FLAG_KINDS,
    FLAG_KINDS,
    LABEL_MAX_CHARS,
    OTHER,
    REQUEST_KINDS,
    REQUEST_STATUSES,
    TOKEN_DIRECTIONS,
    UNKNOWN,
    label_value,
)
from auditor.telemetry.multiproc_dir import (
    MULTIPROC_DIR_ENV,
    ensure_multiprocess_dir,
    mark_process_dead,
    multiprocess_dir,
)
from auditor.telemetry.queue_depth import (
    CELERY_DEFAULT_QUEUE,
    QUEUE_DEPTH_LABELS,
    QUEUE_DEPTH_NAME,
    QueueDepthCollector,
)
from auditor.telemetry.recording import (
    ScoreSample,
    add_tokens,
    observe_batch,
    record_flag,
    record_request,
    record_scores,
    set_drift,
    set_model_loaded,
    set_worker_up,
)

__all__ = [
    "BATCH_ROW_BUCKETS",
    "CELERY_DEFAULT_QUEUE",
    "DIVERGENCE_FLAG_KINDS",
    "FLAG_KINDS",
    "LABEL_MAX_CHARS",
    "LATENCY_BUCKETS",
    "MULTIPROC_DIR_ENV",
    "OTHER",
    "QUEUE_DEPTH_LABELS",
    "QUEUE_DEPTH_NAME",
    "REGISTRY",
    "REQUEST_KINDS",
    "REQUEST_STATUSES",
    "TOKEN_DIRECTIONS",
    "UNKNOWN",
    "WORKER_METRICS_PORT",
    "Z_SCORE_BUCKETS",
    "AuditorMetrics",
    "QueueDepthCollector",
    "ScoreSample",
    "add_tokens",
    "ensure_multiprocess_dir",
    "exported_series",
    "exposition_registry",
    "get_metrics",
    "label_value",
    "mark_process_dead",
    "metrics_asgi_app",
    "multiprocess_dir",
    "observe_batch",
    "record_flag",
    "record_request",
    "record_scores",
    "register_queue_depth",
    "set_drift",
    "set_model_loaded",
    "set_worker_up",
    "start_worker_metrics_server",
]
