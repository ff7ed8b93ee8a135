"""What serving records: the monitored requests, their per-(concept, layer) scores and the flags
raised on them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Double, ForeignKey, Index, Integer, LargeBinary, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from auditor.db.enums import PrivacyMode, RequestStatus
from auditor.db.models.base import (
    FLAG_KINDS,
    PRIVACY_MODES,
    REQUEST_KINDS,
    REQUEST_STATUSES,
    Base,
    BigIntId,
    JSONType,
    UTCDateTime,
    one_of,
    utcnow,
)


class MonitoredRequest(Base):
    __tablename__ = "monitored_requests"
    __table_args__ = (
        one_of("kind", REQUEST_KINDS),
        one_of("status", REQUEST_STATUSES),
        one_of("privacy_mode", PRIVACY_MODES),
        Index("ix_monitored_requests_created_at", "created_at"),
        Index("uq_monitored_requests_idempotency_key", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the caller's request id
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    # Filled by the worker that serves the request; the API has not loaded the model.
    model_fingerprint: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queue_seconds: Mapped[float | None] = mapped_column(Double)
    prefill_seconds: Mapped[float | None] = mapped_column(Double)
    decode_seconds: Mapped[float | None] = mapped_column(Double)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    privacy_mode: Mapped[str] = mapped_column(String(16), default=PrivacyMode.FULL)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    completion_text: Mapped[str | None] = mapped_column(Text)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    completion_sha256: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    steered: Mapped[bool] = mapped_column(default=False, server_default=false())
    # How the answer was read: "ok", "insufficient_tokens" (too short: no flag, no alert),
    # "calibrating" (served before thresholds existed), "off" (divergence flags disabled).
    monitor_status: Mapped[str | None] = mapped_column(String(24))
    # sha256 of (token, route, the client's Idempotency-Key, prompt index): a retry with the
    # same key is this request again, not a second one (auditor.api.idempotency).
    idempotency_key: Mapped[str | None] = mapped_column(String(64))


class RequestScore(Base):
    """One row per (request, concept, layer): aggregates, plus the per-token trace as one
    float32 array value — one row per token would take longer to write than generation took."""

    __tablename__ = "request_scores"
    __table_args__ = (
        # Report queries: one concept over a time range, and everything in a time range.
        Index("ix_request_scores_concept_created", "concept_id", "created_at"),
        Index("ix_request_scores_created_at", "created_at"),
    )

    request_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("monitored_requests.id", ondelete="CASCADE"), primary_key=True
    )
    # No foreign key to concepts, deliberately: Postgres checks one by locking the parent row
    # (FOR KEY SHARE) once per inserted row — 180 locks per request on the same few concept
    # rows, shared by every worker (multixact contention) and ~20% of ingest time.
    # store.insert_scores checks the ids once per request instead; concepts are never deleted.
    concept_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mean: Mapped[float] = mapped_column(Double)
    max: Mapped[float] = mapped_column(Double)
    last: Mapped[float] = mapped_column(Double)
    # Read against standalone neutral text (every layer): for comparing layers and texts.
    calibrated_z: Mapped[float | None] = mapped_column(Double)
    percentile: Mapped[float | None] = mapped_column(Double)
    # Read against ordinary *answers of the same length* (primary layer only): what an alert
    # means. An ordinary answer reads near 0 here; see probes/answer_null.py.
    answer_z: Mapped[float | None] = mapped_column(Double)
    answer_percentile: Mapped[float | None] = mapped_column(Double)
    n_tokens: Mapped[int] = mapped_column(Integer)
    trace: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 LE, n_tokens values
    # Copied from the request so time-range reports need no join.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Flag(Base):
    __tablename__ = "flags"
    __table_args__ = (
        one_of("kind", FLAG_KINDS),
        Index("ix_flags_concept_created", "concept_id", "created_at"),
        Index("ix_flags_kind_created", "kind", "created_at"),
        Index("ix_flags_request_id", "request_id"),  # Postgres does not index foreign keys itself
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), ForeignKey("monitored_requests.id", ondelete="CASCADE"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"))
    layer: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    residual_signal: Mapped[float] = mapped_column(Double)
    text_signal: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float] = mapped_column(Double)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
