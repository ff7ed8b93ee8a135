"""Jobs (extraction, calibration): created queued, started, finished done or failed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from auditor.db.enums import JobKind, JobStatus
from auditor.db.models import Job, utcnow
from auditor.db.store.validation import check_choice
from auditor.errors import JobNotFound


def create_job(session: Session, *, kind: str, payload: Mapping[str, Any]) -> Job:
    check_choice("kind", kind, JobKind.values())
    job = Job(kind=kind, status=JobStatus.QUEUED, payload=dict(payload))
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def start_job(session: Session, *, job_id: str) -> Job:
    job = _require_job(session, job_id)
    job.status = JobStatus.RUNNING
    return job


def finish_job(
    session: Session,
    *,
    job_id: str,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> Job:
    """done with a result, or failed with an error."""
    job = _require_job(session, job_id)
    job.status = JobStatus.FAILED if error is not None else JobStatus.DONE
    job.result = dict(result) if result is not None else None
    job.error = error
    job.finished_at = utcnow()
    return job


def _require_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job
