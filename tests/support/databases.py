"""Fresh throwaway databases for tests: a new Postgres database per use (dropped afterwards), or
a SQLite file. Postgres users skip with the reason when the server is unreachable."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlalchemy.engine import make_url

from auditor.db.engine import normalize_url

PG_ADMIN_URL = os.environ.get("AUDITOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# ---- fresh databases on each backend ----


class Databases:
    """Hands out fresh, empty databases on one backend and removes them afterwards."""

    def __init__(self, backend: str, tmp_dir: Path) -> None:
        self.backend, self.tmp_dir, self.created = backend, tmp_dir, []

    def new_url(self) -> str:
        if self.backend == "sqlite":
            path = self.tmp_dir / f"auditor_{len(self.created)}.db"
            self.created.append(path)
            return f"sqlite:///{path}"
        import psycopg

        name = f"auditor_test_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(normalize_url(PG_ADMIN_URL)).set(database=name).render_as_string(False)

    def drop_all(self) -> None:
        if self.backend != "postgres":
            return  # tmp_path_factory removes the SQLite files
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            for name in self.created:
                # FORCE: a leaked pooled connection must not leave the database behind.
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:  # any failure means "cannot run here", reported as the skip reason
        return f"Postgres unreachable at {PG_ADMIN_URL}: {exc}".strip()
