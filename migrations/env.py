"""Alembic environment for both backends: SQLite (batch mode, since it cannot ALTER most
things in place) and Postgres (psycopg 3)."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

from auditor.db.engine import database_url, make_engine, normalize_url
from auditor.db.models import Base

config = context.config

# Programmatic runs (auditor.db.engine.run_migrations) keep the application's logging as it is.
if config.config_file_name and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _url() -> str:
    """The caller's URL (run_migrations, or -x url=), else AUDITOR_DATABASE_URL, else settings."""
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = os.environ.get("AUDITOR_DATABASE_URL")
    if not url:
        from auditor.settings import get_settings

        url = database_url(get_settings())
    return normalize_url(url)


def _options(dialect_name: str) -> dict:
    return {
        "target_metadata": target_metadata,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: emit the DDL instead of running it."""
    url = _url()
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(url=url, literal_binds=True, **_options(dialect))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # NullPool: a migration is one connection, used once.
    engine = make_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch mode rebuilds a table (copy, drop, rename). With foreign keys on, the DROP
                # deletes every row that references it, cascading: rebuilding monitored_requests
                # would take every score and flag with it. Off for the migration (SQLite reads this
                # pragma only outside a transaction); the connection is used once (NullPool).
                # On the driver's connection, before SQLAlchemy begins one (its BEGIN comes first).
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            context.configure(connection=connection, **_options(connection.dialect.name))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
