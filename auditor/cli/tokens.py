"""API tokens from the command line: `auditor token create|list|revoke` (a sub-app the package
adds to the main one as `token`), and the embedded default's all-scopes token that `auditor run`
issues afresh each start.

Each command migrates the configured database first, so a token can be issued before the API has
ever run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from auditor.cli.app import clear_errors, console, err_console
from auditor.data_dir import ensure_private_dir
from auditor.reports.safe_text import visible_controls
from auditor.settings import get_settings

TOKEN_FILE = "admin-token"

token_app = typer.Typer(help="API tokens: create (the secret is printed once), list, revoke.", no_args_is_help=True)


def embedded_admin_token(url: str, data_dir: Path) -> str:
    """A fresh all-scopes token for this run of the embedded default; the previous run's is
    revoked. Also written (mode 0600) to the data dir, for scripts."""
    from auditor.access import audit_log, tokens
    from auditor.db.engine import make_engine, session_factory, writer_engine
    from auditor.db.models import SCOPES

    engine = make_engine(url)
    try:
        # Reads, then writes, while the in-process worker's threads (retention, drift, a first
        # request) may be writing: on SQLite the write lock is taken up front and waited for, or
        # a commit in between fails this with "database is locked" and `auditor run` exits 1.
        with session_factory(writer_engine(engine))() as session:
            revoked = tokens.revoke_named(session, name=tokens.EMBEDDED_TOKEN_NAME)
            issued = tokens.create_token(
                session, name=tokens.EMBEDDED_TOKEN_NAME, scopes=SCOPES, created_by=audit_log.LOCAL_ACTOR
            )
            audit_log.record(
                session,
                actor=None,
                action="token.create",
                target=f"token:{issued.row.id}",
                details={"name": issued.row.name, "scopes": issued.row.scopes, "revoked_previous": revoked},
            )
            session.commit()
    finally:
        engine.dispose()
    path = ensure_private_dir(data_dir) / TOKEN_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)  # before the secret is written: a file left by an older run may be 0644
    path.write_text(issued.token + "\n")
    return issued.token


@contextmanager
def _session():
    from auditor.db.engine import database_url, make_engine, run_migrations, session_factory

    url = database_url(get_settings())
    with clear_errors():
        run_migrations(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session, clear_errors():
            yield session
    finally:
        engine.dispose()


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="who or what will use it, e.g. 'grafana' or 'alice'")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="admin, client or reader; repeatable")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the token")] = False,
) -> None:
    """Create a token with these scopes. The secret is printed once and stored only hashed."""
    from auditor.access import audit_log, tokens

    with _session() as session:
        issued = tokens.create_token(session, name=name, scopes=scope, created_by=audit_log.LOCAL_ACTOR)
        audit_log.record(
            session,
            actor=None,
            action="token.create",
            target=f"token:{issued.row.id}",
            details={"name": issued.row.name, "scopes": issued.row.scopes, "prefix": issued.row.prefix},
        )
        session.commit()
    if quiet:
        print(issued.token)
    else:
        err_console.print(
            f"token {issued.row.id} '{issued.row.name}' ({', '.join(issued.row.scopes)}); "
            "store it now, it is not shown again:"
        )
        print(issued.token)


@token_app.command("list")
def token_list(include_revoked: Annotated[bool, typer.Option("--all", help="include revoked tokens")] = False) -> None:
    """List tokens (never their secrets)."""
    from auditor.access import tokens

    with _session() as session:
        table = Table("id", "name", "prefix", "scopes", "created", "revoked")
        for row in tokens.list_tokens(session, include_revoked=include_revoked):
            table.add_row(
                str(row.id),
                Text(visible_controls(row.name)),  # a name is the operator's text, not markup
                row.prefix,
                ",".join(row.scopes),
                f"{row.created_at:%Y-%m-%d %H:%M}",
                f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
            )
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="the id from `auditor token list`")]) -> None:
    """Revoke a token; requests carrying it get 401 from then on."""
    from auditor.access import audit_log, tokens

    with _session() as session:
        row = tokens.revoke_token(session, token_id=token_id)
        audit_log.record(
            session,
            actor=None,
            action="token.revoke",
            target=f"token:{row.id}",
            details={"name": row.name, "prefix": row.prefix},
        )
        session.commit()
    console.print(f"revoked token {row.id} '{row.name}'")
