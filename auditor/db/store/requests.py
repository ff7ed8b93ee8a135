"""Monitored requests: creating one (its texts stored as its privacy mode allows), reading it,
and moving it through its statuses (the transition table below), recording the results of
serving it on the way. Also the query of recorded answers a traffic calibration replays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor import privacy
from auditor.db.enums import FINAL_REQUEST_STATUSES, PrivacyMode, RequestKind, RequestStatus
from auditor.db.models import MonitoredRequest, utcnow
from auditor.db.store.validation import check_choice, check_id, check_sha256
from auditor.errors import InvalidInputError, RequestNotFound


def _stored_text(text: str | None, privacy_mode: str) -> tuple[str | None, str | None]:
    """(text to store, sha256 of the original to store). full: both. redacted: the text with
    personal data and secrets masked, and the digest. hash: the digest only (lets an auditor
    match a known prompt without keeping it). See auditor.privacy."""
    return privacy.stored_text(text, privacy_mode)


def create_request(
    session: Session,
    *,
    request_id: str,
    kind: str,
    prompt_text: str | None,
    privacy_mode: str = PrivacyMode.FULL,
    params: Mapping[str, Any] | None = None,
    steered: bool = False,
    model_id: str | None = None,
    model_fingerprint: str | None = None,
    created_at: datetime | None = None,
    idempotency_key: str | None = None,
) -> MonitoredRequest:
    check_id("request_id", request_id)
    check_sha256("idempotency_key", idempotency_key)
    check_choice("kind", kind, RequestKind.values())
    check_choice("privacy_mode", privacy_mode, PrivacyMode.values())
    check_sha256("model_fingerprint", model_fingerprint)
    if session.get(MonitoredRequest, request_id) is not None:
        raise InvalidInputError(f"request {request_id!r} already exists")
    text, digest = _stored_text(prompt_text, privacy_mode)
    request = MonitoredRequest(
        id=request_id,
        kind=kind,
        status=RequestStatus.QUEUED,
        privacy_mode=privacy_mode,
        prompt_text=text,
        prompt_sha256=digest,
        params=dict(params or {}),
        steered=steered,
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        created_at=created_at or utcnow(),
        idempotency_key=idempotency_key,
    )
    session.add(request)
    session.flush()  # scores and flags reference it; raw COPY needs the row in the database
    return request


def requests_by_idempotency_key(session: Session, *, keys: Sequence[str]) -> dict[str, MonitoredRequest]:
    """The requests made under these idempotency keys, by key."""
    rows = session.scalars(select(MonitoredRequest).where(MonitoredRequest.idempotency_key.in_(list(keys))))
    return {row.idempotency_key: row for row in rows}


def get_request(session: Session, *, request_id: str, for_update: bool = False) -> MonitoredRequest | None:
    """`for_update` locks the row until the transaction ends (SELECT ... FOR UPDATE; SQLite,
    which has no row locks, serializes writers anyway): workers check "already done?" and
    record under it, so two runs of one task never both record a request."""
    if for_update:
        return session.get(MonitoredRequest, request_id, with_for_update=True, populate_existing=True)
    return session.get(MonitoredRequest, request_id)


def _require_request(session: Session, request_id: str) -> MonitoredRequest:
    request = session.get(MonitoredRequest, request_id)
    if request is None:
        raise RequestNotFound(request_id)
    return request


# Re-running a failed request, or a task redelivered after a lost worker (acks_late), is allowed;
# a finished request (done, or cancelled by its client) is final.
_NEXT_STATUSES: dict[str, frozenset[RequestStatus]] = {
    RequestStatus.QUEUED: frozenset({RequestStatus.RUNNING, RequestStatus.FAILED, RequestStatus.CANCELLED}),
    RequestStatus.RUNNING: frozenset(
        {RequestStatus.RUNNING, RequestStatus.DONE, RequestStatus.FAILED, RequestStatus.CANCELLED}
    ),
    RequestStatus.FAILED: frozenset({RequestStatus.RUNNING, RequestStatus.FAILED}),
    RequestStatus.DONE: frozenset(),
    RequestStatus.CANCELLED: frozenset(),
}


def mark_request(
    session: Session,
    *,
    request_id: str,
    status: str,
    error: str | None = None,
    completion_text: str | None = None,
    finish_reason: str | None = None,
    model_id: str | None = None,
    model_fingerprint: str | None = None,
    queue_seconds: float | None = None,
    prefill_seconds: float | None = None,
    decode_seconds: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    monitor_status: str | None = None,
) -> MonitoredRequest:
    """Move a request to `status`, stamping started_at / finished_at, and record whatever
    results are given (None leaves a field as it was)."""
    request = _require_request(session, request_id)
    if status not in _NEXT_STATUSES[request.status]:
        raise InvalidInputError(f"request {request_id!r} cannot go from {request.status} to {status}")
    check_sha256("model_fingerprint", model_fingerprint)
    if error is not None and request.privacy_mode != PrivacyMode.FULL:
        error = privacy.redact(error)  # callers scrub the request's own text; this masks the rest
    request.status = status
    if status == RequestStatus.RUNNING:
        request.started_at = utcnow()
    elif status in (*FINAL_REQUEST_STATUSES, RequestStatus.FAILED):
        request.finished_at = utcnow()
    if completion_text is not None:
        request.completion_text, request.completion_sha256 = _stored_text(completion_text, request.privacy_mode)
    updates = {
        "error": error,
        "finish_reason": finish_reason,
        "model_id": model_id,
        "model_fingerprint": model_fingerprint,
        "queue_seconds": queue_seconds,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "monitor_status": monitor_status,
    }
    for field, value in updates.items():
        if value is not None:
            setattr(request, field, value)
    return request


def replayable_requests(since: datetime, until: datetime, fingerprint: str | None = None):
    """SELECT of the recorded answers a traffic calibration can replay, oldest first: finished,
    unsteered, stored verbatim (full privacy mode), in [since, until)."""
    query = select(MonitoredRequest).where(
        MonitoredRequest.status == RequestStatus.DONE,
        MonitoredRequest.privacy_mode == PrivacyMode.FULL,
        MonitoredRequest.steered.is_(False),
        MonitoredRequest.completion_text.is_not(None),
        MonitoredRequest.prompt_text.is_not(None),
        MonitoredRequest.created_at >= since,
        MonitoredRequest.created_at < until,
    )
    if fingerprint is not None:
        query = query.where(MonitoredRequest.model_fingerprint == fingerprint)
    return query.order_by(MonitoredRequest.created_at)
