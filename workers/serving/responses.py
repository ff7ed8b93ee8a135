"""The response body of a monitored answer: what a generation task returns to the API.

One shape, built by `answer_response`, whether the answer was just generated (`served_answer`)
or is read back from its record because another run of the task got there first
(workers.serving.generation.recorded_generation). The one difference between the two is
explicit: a recorded answer's `monitor` carries only its status and length, because the
thresholds that applied at its length and the null's target are not stored with it.
"""

from __future__ import annotations

from typing import Any

from auditor.db.enums import FlagKind, RequestStatus
from probes.answer_null import LengthNull, Reading
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.divergence import Verdict
from workers.monitoring.scores import RequestScores
from workers.serving.model_thread import Served


def _rounded(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


def score_body(
    layer: int,
    mean: float,
    max_: float,
    last: float,
    z: float | None,
    percentile: float | None,
    neutral_z: float | None,
    neutral_percentile: float | None,
) -> dict[str, Any]:
    """One concept's headline scores at its primary layer. `z` and `percentile` are read against
    ordinary answers of the same length (None when the answer was not: too short, calibrating,
    flags off); `neutral_z` / `neutral_percentile` against standalone neutral text, as
    `auditor probe` reads text."""
    return {
        "layer": layer,
        "mean": _rounded(mean),
        "max": _rounded(max_),
        "last": _rounded(last),
        "z": _rounded(z),
        "percentile": _rounded(percentile),
        "neutral_z": _rounded(neutral_z),
        "neutral_percentile": _rounded(neutral_percentile),
    }


def headline(bank: ConceptBank, scores: RequestScores, verdict: Verdict | None = None) -> dict[str, dict[str, Any]]:
    """Per concept, the scores at its primary layer (`score_body`): what the API returns inline."""
    reading = verdict.reading if verdict is not None else None
    out = {}
    for k, name in enumerate(bank.names):
        layer = bank.auto_layers[name]
        if layer not in bank.layers:
            continue
        row = scores.at(name, layer)
        out[name] = score_body(
            layer,
            row["mean"],
            row["max"],
            row["last"],
            reading.residual_z[k] if reading is not None else None,
            reading.percentile[k] if reading is not None else None,
            row.get("z"),
            row.get("percentile"),
        )
    return out


def flag_body(name: str, kind: str, residual_z: float, text_z: float | None, threshold: float, reason: str) -> dict:
    """A flag or alert as returned. `text_z` is None when the text was not re-read (no text
    tokens, or an alert on an answer whose text signal was not computed)."""
    return {
        "concept": name,
        "kind": kind,
        "residual_z": round(residual_z, 4),
        "text_z": None if text_z is None else round(text_z, 4),
        "threshold": round(threshold, 4),
        "reason": reason,
    }


def monitor_body(
    status: str, n_tokens: int, null: LengthNull | None = None, reading: Reading | None = None
) -> dict[str, Any]:
    """How the answer was read: `status` ("ok", "insufficient_tokens", "calibrating", "off", ...),
    the reference its z is read against, and, given the `null` and the `reading`, the thresholds
    that applied at its length."""
    body: dict[str, Any] = {
        "status": status,
        "tokens": n_tokens,
        "reference": "ordinary answers of the same length",
    }
    if null is not None:
        body.update(target_fpr=null.target_fpr, min_tokens=null.min_tokens)
    if reading is not None:
        body.update(
            read_at_length=reading.length_used,
            divergence_threshold=round(reading.divergence_threshold, 4),
            alert_threshold=round(reading.alert_threshold, 4),
        )
    return body


def answer_response(
    *,
    request_id: str,
    text: str | None,
    finish_reason: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    scores: dict[str, dict[str, Any]],
    flags: list[dict[str, Any]],
    monitor: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
    status: str = RequestStatus.DONE,
) -> dict[str, Any]:
    """The response of a finished generation. `flags` are `flag_body`s of every flag and alert
    in the order they were raised; divergence flags (hidden / surface) and concept-score alerts
    (`threshold`) are returned apart."""
    return {
        "request_id": request_id,
        "status": status,
        "text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "scores": scores,
        "flags": [body for body in flags if body["kind"] in (FlagKind.HIDDEN, FlagKind.SURFACE)],
        "alerts": [body for body in flags if body["kind"] == FlagKind.THRESHOLD],
        "monitor": monitor,
        **({"logprobs": logprobs} if logprobs is not None else {}),  # a recorded answer has none
    }


def served_answer(
    request_id: str,
    served: Served,
    finish_reason: str,
    null: LengthNull | None,
    status: str = RequestStatus.DONE,
) -> dict[str, Any]:
    """The response of an answer just generated and read (against `null`, the answer null in
    force for its bank, if one was fitted)."""
    bank, scores, verdict, generation = served.bank, served.scores, served.verdict, served.generation
    names = bank.names
    return answer_response(
        request_id=request_id,
        text=served.text,
        finish_reason=finish_reason,
        prompt_tokens=len(generation.prompt_ids),
        completion_tokens=len(generation.output_ids),
        scores=headline(bank, scores, verdict),
        flags=[
            flag_body(names[f.concept], f.kind, f.residual_z, f.text_z, f.threshold, f.reason)
            for f in [*verdict.flags, *verdict.alerts]
        ],
        monitor=monitor_body(verdict.status, scores.aggregates.n_tokens, null, verdict.reading),
        logprobs=served.logprobs,
        status=status,
    )
