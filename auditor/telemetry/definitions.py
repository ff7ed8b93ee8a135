"""Every Prometheus metric Auditor records, defined once, on first use.

Names follow DESIGN.md: `auditor_<noun>_<unit>`, counters end in `_total`. Label sets are
bounded: concept, layer, model, plus small fixed enumerations (kind, status, direction, queue;
auditor.telemetry.labels). Each gauge says how processes combine in multiprocess mode
(`multiprocess_mode`; auditor.telemetry.multiproc_dir).

The metric objects are created, and registered in prometheus_client's default registry, by the
first call of `get_metrics()`, not at import: defining a metric registers it globally and, in
multiprocess mode, one without labels already writes a file. Deferring that keeps imports free of
side effects, and lets the multiprocess directory be prepared right before the first write.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from auditor.telemetry.multiproc_dir import ensure_multiprocess_dir

# End-to-end on CPU is seconds to minutes (generation), audits of short texts well under one.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Calibrated z of a concept score against neutral text: ~N(0, 1) when the concept is absent,
# thresholds at a 1% false-positive rate sit near 2-3, steered text reaches 5+. With negative
# buckets prometheus_client leaves out `_sum` (a sum that can fall is no counter; multiprocess
# mode still writes one): read this histogram through its buckets and `_count` only.
Z_SCORE_BUCKETS = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Rows generated together in one decode step; BATCH_MAX_SIZE is at most 256.
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class AuditorMetrics:
    """The metric objects. Callers record through auditor.telemetry.recording, which sanitises
    label values the same way everywhere."""

    requests: Counter
    request_latency: Histogram
    tokens: Counter
    concept_score: Histogram
    concept_threshold_exceeded: Counter
    flags: Counter
    worker_up: Gauge
    model_load_seconds: Gauge
    drift_psi: Gauge
    batch_rows: Histogram

    def all(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def _define() -> AuditorMetrics:
    return AuditorMetrics(
        requests=Counter(
            "auditor_requests_total",
            "Monitored requests that ended, by kind (chat, completion, audit) and outcome.",
            ["kind", "status", "model"],
        ),
        request_latency=Histogram(
            "auditor_request_latency_seconds",
            "Seconds from a request's arrival to its end, queueing included.",
            ["kind", "model"],
            buckets=LATENCY_BUCKETS,
        ),
        tokens=Counter(
            "auditor_tokens_total",
            "Tokens processed, by direction (prompt read, completion generated or replayed).",
            ["direction", "model"],
        ),
        concept_score=Histogram(
            "auditor_concept_score",
            "Calibrated z-score of a request's mean concept score against neutral text.",
            ["concept", "layer", "model"],
            buckets=Z_SCORE_BUCKETS,
        ),
        concept_threshold_exceeded=Counter(
            "auditor_concept_threshold_exceeded_total",
            "Requests whose concept score was above the concept's calibrated alert threshold.",
            ["concept", "model"],
        ),
        flags=Counter(
            "auditor_flags_total",
            "Flags raised, by kind (hidden/surface: text and residual stream disagree; threshold; drift).",
            ["kind", "concept", "model"],
        ),
        worker_up=Gauge(
            "auditor_worker_up",
            "1 while a worker process is consuming tasks for this model.",
            ["model"],
            # Number of live worker processes; mark_process_dead() drops a dead process's value.
            multiprocess_mode="livesum",
        ),
        model_load_seconds=Gauge(
            "auditor_model_load_seconds",
            "Seconds the last model load took in this worker process.",
            ["model"],
            multiprocess_mode="livemax",  # the slowest live process is the one worth seeing
        ),
        drift_psi=Gauge(
            "auditor_drift_psi",
            "Population stability index of recent concept scores against the calibration reference.",
            ["concept", "layer", "model"],
            # A property of the traffic, not of a process: the latest computation wins, whoever made it.
            multiprocess_mode="mostrecent",
        ),
        batch_rows=Histogram(
            "auditor_batch_rows",
            "Rows (requests) generated together in one decode step.",
            buckets=BATCH_ROW_BUCKETS,
        ),
    )


_metrics: AuditorMetrics | None = None
_lock = threading.Lock()


def get_metrics() -> AuditorMetrics:
    """The metric objects of this process, defined and registered by the first call."""
    global _metrics
    if _metrics is None:  # checked again under the lock: two threads must not define twice
        with _lock:
            if _metrics is None:
                ensure_multiprocess_dir()
                # `*_created` timestamps would add one gauge series per labelled child, which
                # Prometheus stores but nothing here reads; multiprocess mode never exports them,
                # so both modes now match.
                disable_created_metrics()
                _metrics = _define()
    return _metrics
