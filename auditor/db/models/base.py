"""What every table is built from: the declarative Base with its constraint naming convention,
the portable column types (aware UTC datetimes, JSON/JSONB, 64-bit ids), CHECK constraints over
the closed vocabularies of auditor.db.enums, and the default-value helpers.

Portable across Postgres and SQLite. Ids: rows Auditor creates itself get integer keys
(concepts, flags, calibrations) — compact in `request_scores`, which repeats `concept_id` on
every row; ids that clients see and may supply are strings (`monitored_requests.id` is the
caller's request id, `jobs.id` a uuid4 string). Timestamps are timezone-aware UTC on both
backends; vectors and traces are float32 little-endian bytes; free-form data is JSON (JSONB on
Postgres).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, CheckConstraint, DateTime, Dialect, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase
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
