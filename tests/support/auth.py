"""Test tokens: created straight in the database, as `auditor token create` does."""

from __future__ import annotations

from collections.abc import Iterable

from auditor.access import tokens
from auditor.db.engine import make_engine, run_migrations, session_factory

ALL_SCOPES = ("admin", "client", "reader")


def issue_token(database_url: str, scopes: Iterable[str] = ALL_SCOPES, name: str = "test") -> str:
    """A new bearer token with these scopes, in a database migrated to head (migrating is a no-op
    when it already is)."""
    run_migrations(database_url)
    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as session:
            issued = tokens.create_token(session, name=name, scopes=scopes, created_by="tests")
            session.commit()
            return issued.token
    finally:
        engine.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
