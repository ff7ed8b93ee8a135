"""The helpers the rest of the code records metrics with.

Callers use these, not the metric objects (auditor.telemetry.definitions), so label values are
always sanitised the same way (auditor.telemetry.labels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from auditor.telemetry.definitions import get_metrics
from auditor.telemetry.labels import FLAG_KINDS, REQUEST_KINDS, REQUEST_STATUSES, label_value, layer_label, one_of


def record_request(
    kind: str,
    status: str,
    model: str,
    latency: float | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    """One request ended. `latency` (seconds since it arrived) is observed when known."""
    m = get_metrics()
    kind, model = one_of(kind, REQUEST_KINDS), label_value(model)
    m.requests.labels(kind=kind, status=one_of(status, REQUEST_STATUSES), model=model).inc()
    if latency is not None and math.isfinite(latency) and latency >= 0:
        m.request_latency.labels(kind=kind, model=model).observe(latency)
    add_tokens(model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def add_tokens(model: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    tokens = get_metrics().tokens
    model = label_value(model)
    if prompt_tokens > 0:
        tokens.labels(direction="prompt", model=model).inc(prompt_tokens)
    if completion_tokens > 0:
        tokens.labels(direction="completion", model=model).inc(completion_tokens)


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
    m = get_metrics()
    model = label_value(model)
    exceeded: set[str] = set()
    for sample in samples:
        concept = label_value(sample.concept)
        if sample.z is not None and math.isfinite(sample.z):
            m.concept_score.labels(concept=concept, layer=layer_label(sample.layer), model=model).observe(sample.z)
        if sample.exceeded:
            exceeded.add(concept)
    for concept in exceeded:
        m.concept_threshold_exceeded.labels(concept=concept, model=model).inc()


def record_flag(kind: str, concept: str, model: str, count: int = 1) -> None:
    if count > 0:
        get_metrics().flags.labels(
            kind=one_of(kind, FLAG_KINDS), concept=label_value(concept), model=label_value(model)
        ).inc(count)


def set_drift(concept: str, layer: int, model: str, psi: float) -> None:
    labels = {"concept": label_value(concept), "layer": layer_label(layer), "model": label_value(model)}
    get_metrics().drift_psi.labels(**labels).set(psi)


def observe_batch(rows: int) -> None:
    """Rows in the decode step just run (call once per step)."""
    if rows > 0:
        get_metrics().batch_rows.observe(rows)


def set_model_loaded(model: str, seconds: float) -> None:
    get_metrics().model_load_seconds.labels(model=label_value(model)).set(seconds)


def set_worker_up(model: str, up: bool = True) -> None:
    """Call with True when a worker starts consuming, False when it shuts down."""
    get_metrics().worker_up.labels(model=label_value(model)).set(1 if up else 0)
