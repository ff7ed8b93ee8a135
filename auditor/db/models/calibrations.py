"""Calibrations: the null of a concept's score at one layer on reference text, and the
length-aware null of ordinary answers for one bank of concept versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Double, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from auditor.db.models.base import Base, JSONType, UTCDateTime, utcnow


class Calibration(Base):
    """Null distribution of one concept's score at one layer on neutral reference text."""

    __tablename__ = "calibrations"
    __table_args__ = (Index("ix_calibrations_concept_layer_created", "concept_id", "layer", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"))
    layer: Mapped[int] = mapped_column(Integer)
    mean: Mapped[float] = mapped_column(Double)
    std: Mapped[float] = mapped_column(Double)
    n_reference: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float | None] = mapped_column(Double)
    target_fpr: Mapped[float | None] = mapped_column(Double)
    achieved_fpr: Mapped[float | None] = mapped_column(Double)
    reference: Mapped[list[float]] = mapped_column(JSONType, default=list)  # sorted scores
    typical_norm: Mapped[float | None] = mapped_column(Double)  # median residual norm at this layer
    reference_set: Mapped[str] = mapped_column(String(64), default="neutral", server_default="neutral")
    reference_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the reference texts
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AnswerCalibration(Base):
    """The length-aware null of ordinary answers for one set of active concept versions
    (probes.answer_null.LengthNull as JSON), with its family-wise thresholds. Fitted on the
    control prompts' answers, or on the deployment's own recorded traffic over a window."""

    __tablename__ = "answer_calibrations"
    __table_args__ = (Index("ix_answer_calibrations_bank_created", "bank_key", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bank_key: Mapped[str] = mapped_column(String(64))  # sha256 of the concept versions read
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    concept_ids: Mapped[list[int]] = mapped_column(JSONType)  # in the null's concept order
    source: Mapped[str] = mapped_column(String(16))  # "control" or "traffic"
    window_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    n_answers: Mapped[int] = mapped_column(Integer)
    target_fpr: Mapped[float] = mapped_column(Double)
    confidence: Mapped[float] = mapped_column(Double)
    min_tokens: Mapped[int] = mapped_column(Integer)
    certified_length: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    null: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
