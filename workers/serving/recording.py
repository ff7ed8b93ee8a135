"""What a scored answer leaves behind besides its response: its score rows, its flag rows, and
its Prometheus samples. A generation and an audit record the same way
(workers.serving.generation, workers.serving.audits)."""

from __future__ import annotations

from typing import Any

from auditor.db import store
from auditor.db.labels import concept_name
from auditor.telemetry import metrics
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.divergence import OK, Verdict
from workers.monitoring.scores import RequestScores


def score_rows(
    bank: ConceptBank, scores: RequestScores, verdict: Verdict | None = None, traces: bool = False
) -> list[dict[str, Any]]:
    """One row per (concept version, layer) that holds a vector; with `traces`, each row also
    carries its per-token cosine trace (float32, one value per scored token). Each concept's
    primary-layer row also carries its z and percentile against ordinary answers of the same
    length, when the answer was read against them."""
    reading = verdict.reading if verdict is not None else None
    rows = []
    for li, layer in enumerate(bank.layers):
        for k, concept_id in enumerate(bank.concept_ids):
            if bank.mask is not None and not bool(bank.mask[li, k]):
                continue
            primary = reading is not None and layer == bank.auto_layers[bank.names[k]]
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(scores.aggregates.mean[li, k]), "max": float(scores.aggregates.max[li, k]),
                "last": float(scores.aggregates.last[li, k]),
                "calibrated_z": float(scores.z_mean[li, k]) if scores.z_mean is not None else None,
                "percentile": float(scores.percentile_mean[li, k]) if scores.percentile_mean is not None else None,
                "answer_z": float(reading.residual_z[k]) if primary else None,
                "answer_percentile": float(reading.percentile[k]) if primary else None,
                "n_tokens": scores.aggregates.n_tokens,
                "trace": scores.per_token[li, :, k].float() if traces else None,
            })  # fmt: skip
    return rows


def store_verdict(session, *, request_id: str, bank: ConceptBank, verdict: Verdict) -> None:
    """Flags (hidden / surface) and alerts (kind `threshold`) as rows, each at its concept's
    primary layer with both signals and the threshold that applied."""
    for flag in [*verdict.flags, *verdict.alerts]:
        store.add_flag(
            session,
            request_id=request_id,
            concept_id=bank.concept_ids[flag.concept],
            layer=bank.auto_layers[bank.names[flag.concept]],
            kind=flag.kind,
            residual_signal=flag.residual_z,
            text_signal=flag.text_z,
            threshold=flag.threshold,
            reason=flag.reason,
        )


def record_metrics(model_id: str, bank: ConceptBank, verdict: Verdict) -> None:
    """Prometheus: each concept's z against ordinary answers of the same length at its primary
    layer, and whether it crossed the family-wise alert threshold (bounded series: concept ×
    primary layer × model, never per layer). Answers not read against answers (too short,
    calibrating, flags off) are not observed: their numbers are in other units."""
    reading = verdict.reading
    if reading is None or verdict.status != OK:
        return
    samples = [
        metrics.ScoreSample(
            concept_name(name), bank.auto_layers[name], float(reading.residual_z[k]), exceeded=bool(reading.alert[k])
        )
        for k, name in enumerate(bank.names)
    ]
    metrics.record_scores(model_id, samples)
    for flag in verdict.flags:
        metrics.record_flag(flag.kind, concept_name(bank.names[flag.concept]), model_id)
