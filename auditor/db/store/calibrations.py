"""Calibrations: the null of one concept's score at one layer on a reference text set, and the
length-aware null of ordinary answers for one bank of concept versions (answer calibrations);
the newest of each, and the newest ids (a cheap staleness check)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from auditor.db.enums import CalibrationSource
from auditor.db.models import AnswerCalibration, Calibration
from auditor.db.store.codecs import optional_float
from auditor.db.store.validation import check_choice, check_sha256


def add_calibration(
    session: Session,
    *,
    concept_id: int,
    layer: int,
    mean: float,
    std: float,
    reference: Sequence[float],
    threshold: float | None = None,
    target_fpr: float | None = None,
    achieved_fpr: float | None = None,
    typical_norm: float | None = None,
    reference_set: str = "neutral",
    reference_hash: str | None = None,
) -> Calibration:
    check_sha256("reference_hash", reference_hash)
    calibration = Calibration(
        concept_id=concept_id,
        layer=layer,
        mean=float(mean),
        std=float(std),
        n_reference=len(reference),
        reference=sorted(float(score) for score in reference),  # percentiles by bisection
        threshold=optional_float(threshold),
        target_fpr=optional_float(target_fpr),
        achieved_fpr=optional_float(achieved_fpr),
        typical_norm=optional_float(typical_norm),
        reference_set=reference_set,
        reference_hash=reference_hash,
    )
    session.add(calibration)
    session.flush()
    return calibration


def latest_calibration(session: Session, *, concept_id: int, layer: int) -> Calibration | None:
    query = (
        select(Calibration)
        .where(Calibration.concept_id == concept_id, Calibration.layer == layer)
        .order_by(Calibration.created_at.desc(), Calibration.id.desc())
        .limit(1)
    )
    return session.scalar(query)


def latest_calibrations(
    session: Session, *, concept_ids: Sequence[int], reference_set: str = "neutral"
) -> dict[tuple[int, int], Calibration]:
    """The newest calibration from `reference_set` of every (concept version, layer) among
    `concept_ids`, in one query."""
    if not concept_ids:
        return {}
    newest = (
        select(Calibration.concept_id, Calibration.layer, func.max(Calibration.id).label("id"))
        .where(Calibration.concept_id.in_(list(concept_ids)), Calibration.reference_set == reference_set)
        .group_by(Calibration.concept_id, Calibration.layer)
        .subquery()
    )
    rows = session.scalars(select(Calibration).join(newest, Calibration.id == newest.c.id))
    return {(row.concept_id, row.layer): row for row in rows}


def add_answer_calibration(
    session: Session,
    *,
    bank_key: str,
    model_fingerprint: str,
    concept_ids: Sequence[int],
    source: str,
    null: Mapping[str, Any],
    summary: Mapping[str, Any],
    window_start: datetime | None = None,
    window_end: datetime | None = None,
) -> AnswerCalibration:
    """Store a length-aware null (probes.answer_null.null_to_dict) for one bank of concepts."""
    check_sha256("bank_key", bank_key)
    check_sha256("model_fingerprint", model_fingerprint)
    check_choice("source", source, CalibrationSource.values())
    row = AnswerCalibration(
        bank_key=bank_key,
        model_fingerprint=model_fingerprint,
        concept_ids=[int(i) for i in concept_ids],
        source=source,
        window_start=window_start,
        window_end=window_end,
        n_answers=int(summary["n_answers"]),
        target_fpr=float(null["target_fpr"]),
        confidence=float(null["confidence"]),
        min_tokens=int(null["min_tokens"]),
        certified_length=int(null["certified_length"]),
        summary=dict(summary),
        null=dict(null),
    )
    session.add(row)
    session.flush()
    return row


def latest_answer_calibration(session: Session, *, bank_key: str) -> AnswerCalibration | None:
    """The newest length-aware null fitted for exactly this bank of concept versions."""
    return session.scalar(
        select(AnswerCalibration)
        .where(AnswerCalibration.bank_key == bank_key)
        .order_by(AnswerCalibration.id.desc())
        .limit(1)
    )


def newest_answer_calibration_id(session: Session) -> int | None:
    return session.scalar(select(func.max(AnswerCalibration.id)))


def newest_calibration_id(session: Session) -> int | None:
    """Changes whenever any calibration is stored: a cheap per-request staleness check."""
    return session.scalar(select(func.max(Calibration.id)))
