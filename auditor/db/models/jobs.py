"""Extraction and calibration jobs run by workers on behalf of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from auditor.db.enums import JobStatus
from auditor.db.models.base import JOB_KINDS, JOB_STATUSES, Base, JSONType, UTCDateTime, new_uuid, one_of, utcnow


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (one_of("kind", JOB_KINDS), one_of("status", JOB_STATUSES))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
