"""Database tables, portable across Postgres and SQLite.

Ids: rows Auditor creates itself get integer keys (concepts, flags, calibrations) — compact in
`request_scores`, which repeats `concept_id` on every row; ids that clients see and may supply
are strings (`monitored_requests.id` is the caller's request id, `jobs.id` a uuid4 string).
Timestamps are timezone-aware UTC on both backends; vectors and traces are float32
little-endian bytes; free-form data is JSON (JSONB on Postgres).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
    inspect,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from auditor.db.enums import (
    ConceptSource,
    FlagKind,
    JobKind,
    JobStatus,
    PrivacyMode,
    RequestKind,
    RequestStatus,
    Scope,
)
from auditor.errors import AuditorError

# The values each CHECK constraint allows (the vocabularies themselves: auditor.db.enums).
CONCEPT_SOURCES = ConceptSource.values()
REQUEST_KINDS = RequestKind.values()
REQUEST_STATUSES = RequestStatus.values()
PRIVACY_MODES = PrivacyMode.values()
FLAG_KINDS = FlagKind.values()
JOB_KINDS = JobKind.values()
JOB_STATUSES = JobStatus.values()
SCOPES = Scope.values()

# Deterministic constraint names: Alembic needs them to drop or alter constraints, and SQLite's
# batch mode (copy-and-move) cannot refer to an unnamed one.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres: indexable and compact; plain JSON (text) on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements an INTEGER PRIMARY KEY, not a BIGINT one.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends. SQLite keeps no zone, so what it returns is naive
    UTC (we only ever write UTC); Postgres returns the session's zone, converted back to UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    """A CHECK instead of a native ENUM: portable, and adding a value later is a plain migration."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return CheckConstraint(f"{column} IN ({quoted})", name=column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Concept(Base):
    """One concept *version*: immutable once written except `active` / `retired_at`.
    A new vector for the same name is a new row with the next version number."""

    __tablename__ = "concepts"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
        one_of("source", CONCEPT_SOURCES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(default=True, server_default=true())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # Provenance: a vector is only meaningful in the basis it was extracted in (DESIGN.md).
    model_id: Mapped[str] = mapped_column(String(512))
    model_revision: Mapped[str | None] = mapped_column(String(256))
    model_fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 hex
    loader: Mapped[str] = mapped_column(String(64))
    hook_point: Mapped[str] = mapped_column(String(128))
    d_model: Mapped[int] = mapped_column(Integer)
    n_layers_model: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(64))
    pooling: Mapped[str] = mapped_column(String(64))
    n_pairs: Mapped[int | None] = mapped_column(Integer)  # None for uploaded vectors
    pairs_hash: Mapped[str | None] = mapped_column(String(64))
    vector_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the stored bytes, layer order
    source: Mapped[str] = mapped_column(String(32))
    primary_layer: Mapped[int] = mapped_column(Integer)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    vectors: Mapped[list[ConceptVector]] = relationship(
        back_populates="concept", order_by="ConceptVector.layer", cascade="all, delete-orphan"
    )


class ConceptVector(Base):
    """One unit direction of a concept version at one layer (float32 LE, d_model values)."""

    __tablename__ = "concept_vectors"

    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary)

    concept: Mapped[Concept] = relationship(back_populates="vectors")


class MonitoredRequest(Base):
    __tablename__ = "monitored_requests"
    __table_args__ = (
        one_of("kind", REQUEST_KINDS),
        one_of("status", REQUEST_STATUSES),
        one_of("privacy_mode", PRIVACY_MODES),
        Index("ix_monitored_requests_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the caller's request id
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
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
    privacy_mode: Mapped[str] = mapped_column(String(16), default="full")
    prompt_text: Mapped[str | None] = mapped_column(Text)
    completion_text: Mapped[str | None] = mapped_column(Text)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    completion_sha256: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    steered: Mapped[bool] = mapped_column(default=False, server_default=false())
    # How the answer was read: "ok", "insufficient_tokens" (too short: no flag, no alert),
    # "calibrating" (served before thresholds existed), "off" (divergence flags disabled).
    monitor_status: Mapped[str | None] = mapped_column(String(24))


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


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (one_of("kind", JOB_KINDS), one_of("status", JOB_STATUSES))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """An API bearer token. Only its sha256 is stored: the secret is shown once, at creation.
    `prefix` is the public part of the token, indexed so a lookup never scans hashes."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSONType)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AdminAction(Base):
    """Append-only log of admin actions: who (token name and prefix), what, when, and the
    vector's hash when the action registered or changed a concept."""

    __tablename__ = "admin_audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    actor_prefix: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(256))
    vector_hash: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class DailyRollup(Base):
    """What retention (auditor/db/retention.py) keeps of requests older than its window: per UTC
    day, serving model and concept version, the count, sum, sum of squares, min and max of the
    primary-layer raw score and of the calibrated z (over the rows that have one), and the
    requests flagged for the concept (at any layer), in all and by kind. Sums rather than means,
    so that batches and concurrent runs add up exactly: mean = sum / n, var = sumsq / n − mean²."""

    __tablename__ = "daily_rollups"
    __table_args__ = (Index("ix_daily_rollups_concept_day", "concept_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(512), primary_key=True)  # "" when unknown
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"), primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(Integer)  # the concept version's primary layer
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    score_sum: Mapped[float] = mapped_column(Double, default=0.0)
    score_sumsq: Mapped[float] = mapped_column(Double, default=0.0)
    score_min: Mapped[float | None] = mapped_column(Double)
    score_max: Mapped[float | None] = mapped_column(Double)
    z_count: Mapped[int] = mapped_column(BigInteger, default=0)
    z_sum: Mapped[float] = mapped_column(Double, default=0.0)
    z_sumsq: Mapped[float] = mapped_column(Double, default=0.0)
    z_min: Mapped[float | None] = mapped_column(Double)
    z_max: Mapped[float | None] = mapped_column(Double)
    flagged: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_hidden: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_surface: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_threshold: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_drift: Mapped[int] = mapped_column(BigInteger, default=0)


# ---- immutability of registered vectors (ORM-level guard; the store never issues raw UPDATEs) ----

_MUTABLE_CONCEPT_COLUMNS = frozenset({"active", "retired_at"})


@event.listens_for(Concept, "before_update")
def _concept_is_immutable(mapper: Mapper[Any], _connection: Any, target: Concept) -> None:
    state = inspect(target)
    changed = {attr.key for attr in mapper.column_attrs if state.attrs[attr.key].history.has_changes()}
    if changed - _MUTABLE_CONCEPT_COLUMNS:
        raise AuditorError(
            f"concept {target.name} v{target.version} is immutable; tried to change "
            f"{sorted(changed - _MUTABLE_CONCEPT_COLUMNS)} — register a new version instead"
        )


@event.listens_for(ConceptVector, "before_update")
def _vector_is_immutable(_mapper: Mapper[Any], _connection: Any, target: ConceptVector) -> None:
    raise AuditorError(f"concept vector (concept {target.concept_id}, layer {target.layer}) is immutable")
