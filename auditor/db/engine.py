"""Engines, sessions and migrations.

SQLite file in the data directory by default (the embedded `make run` path); Postgres through
psycopg 3 in production. Migrations run through Alembic's API so the CLI, tests and benchmarks
never shell out to the `alembic` command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from auditor.data_dir import ensure_private_dir, ensure_private_file
from auditor.errors import AuditorError
from auditor.settings import Settings

# Drivers that mean "Postgres, whichever driver SQLAlchemy would guess": pin them to psycopg 3,
# the one installed (SQLAlchemy would otherwise look for psycopg2).
_POSTGRES_ALIASES = {"postgres", "postgresql"}


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` -> `postgresql+psycopg://`; anything else unchanged."""
    parsed = make_url(url)
    if parsed.drivername in _POSTGRES_ALIASES:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def database_url(settings: Settings) -> str:
    """The configured URL, or a SQLite file in the data directory (created, 0700, if missing)."""
    if settings.database_url:
        return normalize_url(settings.database_url)
    ensure_private_dir(settings.data_dir)
    # Absolute, so the API, a worker and Alembic agree on the file whatever their working directory.
    return f"sqlite:///{(settings.data_dir / 'auditor.db').resolve()}"


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        _create_sqlite_file(url)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    # pre_ping: a worker idles for hours between jobs; a server-closed connection must not fail one.
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _create_sqlite_file(url: str) -> None:
    """A database file that does not exist yet is created here, 0600, before SQLite would create
    it world-readable (0644 under the usual umask); its -wal and -shm files take its mode.
    In-memory and URI-form databases are SQLite's; a missing directory stays SQLite's error."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.parent.is_dir():
        ensure_private_file(path)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3's legacy mode skips BEGIN before SELECT/DDL/SAVEPOINT; SQLAlchemy emits its own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite, per connection
        # WAL: readers (reports, /metrics) never block the worker writing scores, and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL stays consistent; only the last commits can be lost on power failure.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")  # wait for the one writer instead of failing
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))


_SQLITE_BEGIN = "auditor_sqlite_begin"


def writer_engine(engine: Engine) -> Engine:
    """The same engine (and pool) for sessions that read, then write. On SQLite their
    transactions start IMMEDIATE, taking the write lock up front and waiting out busy_timeout
    in turn: a deferred transaction that reads and then writes fails at once with "database is
    locked" if another thread committed in between (SQLite cannot upgrade a stale snapshot),
    which the embedded default's concurrent task threads do all the time. Readers keep plain
    deferred transactions, so under WAL they never wait for a writer. No effect on Postgres."""
    if engine.dialect.name != "sqlite":
        return engine
    return engine.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after the caller commits (API responses).
    return sessionmaker(engine, expire_on_commit=False)


# ---- migrations ----


def migrations_dir() -> Path:
    """The Alembic directory: $AUDITOR_MIGRATIONS_DIR, beside the package (source checkout),
    or ./migrations (the Docker image installs the package but copies migrations/ to /app)."""
    candidates = [
        os.environ.get("AUDITOR_MIGRATIONS_DIR"),
        Path(__file__).resolve().parents[2] / "migrations",
        Path.cwd() / "migrations",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "env.py").is_file():
            return Path(candidate)
    raise AuditorError("Alembic migrations directory not found: set AUDITOR_MIGRATIONS_DIR")


def _alembic_config(url: str):  # -> alembic.config.Config (imported lazily: only migrate needs it)
    from alembic.config import Config

    directory = migrations_dir()
    config = Config(str(directory / "alembic.ini"))
    config.set_main_option("script_location", str(directory))
    # Passed as an attribute, not a main option: ini interpolation would mangle a '%' in a password.
    config.attributes["url"] = normalize_url(url)
    # Leave the application's logging alone (alembic.ini's fileConfig would replace it).
    config.attributes["configure_logging"] = False
    return config


def run_migrations(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(_alembic_config(url), revision)
