"""Handing work to a worker, the one way every route does it: commit the rows the work is about,
then queue the task (a worker never sees an id the database lacks). When the task cannot be
queued, the rows say so ("not queued: ...", failed: nothing will ever run them) and the caller
hears 503 with Retry-After. Requests (completions, audits) and admin jobs differ only in how a
row is marked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from auditor.access import audit_log
from auditor.access.tokens import Principal
from auditor.api.errors import error_body, unavailable
from auditor.api.schemas import JobAccepted
from auditor.db import store
from auditor.db.enums import JobKind, JobStatus, RequestKind, RequestStatus
from auditor.errors import BrokerUnavailable, WorkerUnavailable
from auditor.telemetry import metrics

T = TypeVar("T")
log = logging.getLogger(__name__)


def no_worker(request: Request, hint: str | None = None) -> JSONResponse | None:
    """503 when this app has no dispatcher at all; checked before anything is written."""
    if request.app.state.dispatcher is not None:
        return None
    message = "no worker is configured" + (f" ({hint})" if hint else "")
    return JSONResponse(error_body(message, "worker_unavailable", ("server",)), status_code=503)


def _hand_over(
    session: Session,
    send: Callable[[], T],
    *,
    not_queued: Callable[[str], None],
    on_unavailable: Callable[[], None] = lambda: None,
    waits: bool = False,
) -> T | JSONResponse:
    """Commit, `send()`, and on WorkerUnavailable answer 503. A task that never got queued (a
    failed submit, or the broker refusing it) is marked on its rows by `not_queued(error)`; one
    queued and waited on (`waits`) that no worker finished in time is left as it is: a worker
    may still run it, and records it when it does."""
    session.commit()  # the rows first: a worker never sees an id the database lacks
    try:
        return send()
    except WorkerUnavailable as exc:
        on_unavailable()
        if not waits or isinstance(exc, BrokerUnavailable):
            not_queued(f"not queued: {exc}")
            session.commit()
        return unavailable(exc)


def _request_rows(
    session: Session, request_ids: list[str], kind: RequestKind, model_id: str
) -> tuple[Callable[[str], None], Callable[[], None]]:
    """What a refusal does to monitored requests: each is counted unavailable, and failed when
    it was never queued."""

    def not_queued(error: str) -> None:
        for request_id in request_ids:
            store.mark_request(session, request_id=request_id, status=RequestStatus.FAILED, error=error[:2000])

    def on_unavailable() -> None:
        for _ in request_ids:
            metrics.record_request(kind, "unavailable", model_id)

    return not_queued, on_unavailable


def run_requests(
    request: Request,
    session: Session,
    task: str,
    arg_lists: list[list[Any]],
    *,
    request_ids: list[str],
    kind: RequestKind,
    model_id: str,
    timeout: float,
) -> list[dict] | JSONResponse:
    """Commit the requests' rows, queue one `task` per request under its id (all at once: the
    worker batches them) and wait up to `timeout` in all for every result."""
    dispatcher = request.app.state.dispatcher
    not_queued, on_unavailable = _request_rows(session, request_ids, kind, model_id)

    def send() -> list[dict]:
        try:
            if len(request_ids) == 1:
                return [dispatcher.run(task, arg_lists[0], task_id=request_ids[0], timeout=timeout)]
            return dispatcher.run_many(task, arg_lists, task_ids=request_ids, timeout=timeout)
        except WorkerUnavailable as exc:
            if not isinstance(exc, BrokerUnavailable):
                _give_up(request, request_ids)
            raise

    return _hand_over(session, send, not_queued=not_queued, on_unavailable=on_unavailable, waits=True)


def _give_up(request: Request, request_ids: list[str]) -> None:
    """Nobody waits for these answers any more: ask the worker to stop them (it records each
    `cancelled` with what it had, or before it starts), rather than run on for nobody."""
    streams = request.app.state.streams
    if streams is None:
        return
    for request_id in request_ids:
        try:
            streams.cancel_now(request_id)
        except Exception:  # Redis away too: the worker finishes and records the answer as usual
            log.warning("could not cancel %s after its timeout", request_id, exc_info=True)


def submit_requests(
    request: Request,
    session: Session,
    task: str,
    args: list[Any],
    *,
    request_ids: list[str],
    kind: RequestKind,
    model_id: str,
) -> JSONResponse | None:
    """Commit the requests' rows and queue one `task` for them all, named after the first."""
    dispatcher = request.app.state.dispatcher
    not_queued, on_unavailable = _request_rows(session, request_ids, kind, model_id)
    return _hand_over(
        session,
        lambda: dispatcher.submit(task, args, task_id=request_ids[0]),
        not_queued=not_queued,
        on_unavailable=on_unavailable,
    )


def submit_job(
    request: Request, session: Session, principal: Principal, *, kind: JobKind, task: str, payload: dict
) -> JSONResponse:
    """An admin job: its row and the audit-log entry, then the task; 202 with the job to poll."""
    if (error := no_worker(request)) is not None:
        return error
    job = store.create_job(session, kind=kind, payload=payload)
    audit_log.record(
        session,
        actor=principal,
        action=f"job.{kind}",
        target=f"job:{job.id}",
        details={key: value for key, value in payload.items() if key != "concept"},
    )
    dispatcher = request.app.state.dispatcher
    refused = _hand_over(
        session,
        lambda: dispatcher.submit(task, [job.id], task_id=f"job-{job.id}"),
        not_queued=lambda error: store.finish_job(session, job_id=job.id, error=error),
    )
    if refused is not None:
        return refused
    poll = f"/admin/jobs/{job.id}"
    body = JobAccepted(job_id=job.id, kind=kind, status=JobStatus.QUEUED, poll=poll)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_202_ACCEPTED, headers={"Location": poll})
