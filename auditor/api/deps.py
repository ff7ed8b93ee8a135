"""Dependencies: settings read once at the edge, one session per request (commit on success):
`SessionDep` for routes that write, `ReadSessionDep` for routes that only read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from auditor.model_identity import ModelFingerprint
from auditor.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. The route commits when its writes are complete; anything
    uncommitted (a route that raised) is rolled back when the session closes, so a rejected
    request leaves nothing half-written."""
    with request.app.state.sessions() as session:
        yield session


def get_read_session(request: Request) -> Iterator[Session]:
    """One session per request for a route that only reads: a plain deferred transaction on
    SQLite, never the write lock `get_session` takes up front (auditor.db.engine.writer_engine).
    Under WAL it reads one snapshot while the worker records scores, neither waiting for the
    other; on the write lock a long report would hold back every write until they fail with
    "database is locked". Nothing written through it may be committed: a deferred transaction
    that reads and then writes fails if another writer committed in between. Same as
    `get_session` on Postgres."""
    with request.app.state.read_sessions() as session:
        yield session


def get_fingerprint(request: Request) -> ModelFingerprint:
    return request.app.state.fingerprint()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
FingerprintDep = Annotated[ModelFingerprint, Depends(get_fingerprint)]
# A database row id in a path: ids start at 1 and are 32-bit integers (Postgres `integer`). Past
# that, the lookup itself fails (Postgres: "integer out of range"; SQLite past int64): a 500.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
