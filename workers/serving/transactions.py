"""A worker's database writes: each one transaction, retried whole while the database is away.

Exactly once, across crashes and restarts: a task can run more than once. Redis re-delivers it
when its worker dies mid-task (acks are late) or holds it past the visibility timeout, and the
API sends it again when Redis comes back without it (auditor.queue.dispatch). Each run takes the
request's row lock (SELECT … FOR UPDATE; SQLite's BEGIN IMMEDIATE does the same) when it starts
and when it writes: a request already done is final, so a later run writes nothing and answers
with the recorded result, and of two runs at once the first to write wins
(workers.serving.generation, workers.serving.audits). Every write is one transaction, retried
whole while the database is away (`in_transaction`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from auditor.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class SessionOwner(Protocol):
    """What a retried write needs: the retry settings and a session factory (a
    `WorkerContext` in a worker, anything with these members in a test)."""

    settings: Settings
    sessions: Callable[[], Session]


def retryable(exc: BaseException) -> bool:
    """A lost or refused connection, a server shutting down or starting up, a serialization
    failure or deadlock: the same transaction can succeed later. Constraint violations and bad
    input cannot."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:  # an optional driver: SQLite deployments run without it
        import psycopg
    except ImportError:
        return False
    # COPY runs on the raw driver connection: its errors arrive unwrapped.
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def in_transaction(owner: SessionOwner, work: Callable[[Session], T], what: str) -> T:
    """`work(session)` in a session and transaction of its own, then commit; returns what it
    returns. While the database is unreachable the whole transaction is retried with
    exponential backoff (0.2 s doubling up to `db_retry_max_backoff`) for up to
    `db_retry_seconds`, so a database restart delays a worker's writes instead of losing them;
    after that the error is raised."""
    settings = owner.settings
    deadline = time.monotonic() + settings.db_retry_seconds
    pause = 0.2
    while True:
        try:
            with owner.sessions() as session:
                result = work(session)
                session.commit()
                return result
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + pause > deadline:
                raise
            first_line = " ".join(str(exc).split())[:200]
            log.warning(
                "database unavailable while %s, retrying in %.1fs: %s: %s", what, pause, type(exc).__name__, first_line
            )
            time.sleep(pause)
            pause = min(pause * 2, settings.db_retry_max_backoff)
