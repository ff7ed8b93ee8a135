"""Tokens and scopes on every route, the admin audit log, and `auditor token`, over real HTTP
on real Postgres and on SQLite."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from auditor.access import tokens
from auditor.api.main import create_app
from auditor.api.security import PUBLIC_PATHS
from auditor.cli import app as cli_app
from auditor.cli.tokens import embedded_admin_token as _embedded_admin_token
from auditor.db.engine import make_engine, run_migrations, session_factory
from auditor.db.models import AdminAction, ApiToken
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.databases import Databases, _postgres_reachable
from support.http_server import serving

D_MODEL = 576
# Which scope each part of the API needs (auditor/api/main.py).
SCOPE_BY_PREFIX = (("/admin/", "admin"), ("/v1/", "client"), ("/reports/", "reader"))


def required_scope(path: str) -> str:
    return next(scope for prefix, scope in SCOPE_BY_PREFIX if path.startswith(prefix))


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def service(request, tmp_path_factory) -> Iterator[dict]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    databases = Databases(request.param, tmp_path_factory.mktemp(f"auth-{request.param}"))
    url = databases.new_url()
    run_migrations(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path_factory.mktemp("data")))
    scoped = {scope: issue_token(url, scopes=[scope], name=f"only-{scope}") for scope in ("admin", "client", "reader")}
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
        yield {"url": url, "http": http, "tokens": scoped, "openapi": app.openapi()}
    databases.drop_all()


def operations(openapi: dict) -> list[tuple[str, str, str]]:
    """(method, concrete path, template) for every operation the API documents."""
    filled = []
    for template, methods in openapi["paths"].items():
        path = re.sub(r"\{[^}]+_id\}", "999999", template)  # no such row: nothing is changed
        assert "{" not in path, f"add a value for the parameter in {template}"
        filled += [(method.upper(), path, template) for method in methods]
    return filled


def test_every_documented_route_needs_a_token_with_its_scope(service):
    http, scoped = service["http"], service["tokens"]
    ops = operations(service["openapi"])
    assert len(ops) >= 25  # the walk covers the whole API, not a stub
    checked = 0
    for method, path, template in ops:
        if template in PUBLIC_PATHS:
            continue
        needed = required_scope(template)
        anonymous = http.request(method, path)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["www-authenticate"] == "Bearer"
        forged = http.request(method, path, headers=bearer(scoped[needed][:-4] + "AAAA"))  # right prefix, wrong secret
        assert forged.status_code == 401, (method, path)
        for scope, token in scoped.items():
            answer = http.request(method, path, headers=bearer(token))
            if scope == needed:
                # Past authorisation: whatever the route says about an empty request, not 401/403.
                assert answer.status_code not in (401, 403), (method, path, scope, answer.text)
            else:
                assert answer.status_code == 403, (method, path, scope, answer.text)
                assert f"lacks scope '{needed}'" in answer.json()["error"]["message"]
        checked += 1
    assert checked == len(ops) - len(PUBLIC_PATHS & set(service["openapi"]["paths"]))


def test_probes_and_metrics_stay_open(service):
    http = service["http"]
    assert http.get("/healthz").status_code == 200
    assert http.get("/metrics").status_code == 200
    assert http.get("/readyz").status_code == 503  # open (not 401), and this app has no worker: not ready


def test_tokens_are_stored_hashed_and_a_revoked_token_is_refused(service):
    http, admin = service["http"], bearer(service["tokens"]["admin"])
    created = http.post("/admin/tokens", headers=admin, json={"name": "grafana", "scopes": ["reader"]})
    assert created.status_code == 201, created.text
    secret, token_id = created.json()["token"], created.json()["id"]
    assert http.get("/reports/summary", headers=bearer(secret)).status_code == 200
    engine = make_engine(service["url"])
    try:
        with session_factory(engine)() as session:
            row = session.get(ApiToken, token_id)
            assert row.token_sha256 == hashlib.sha256(secret.encode()).hexdigest()
            stored = [v for r in session.scalars(select(ApiToken)) for v in (r.name, r.prefix, r.token_sha256)]
            assert secret not in stored and all(secret not in v for v in stored)
    finally:
        engine.dispose()
    listed = http.get("/admin/tokens", headers=admin).json()
    assert "token" not in listed[0] and token_id in [t["id"] for t in listed]
    assert http.delete(f"/admin/tokens/{token_id}", headers=admin).status_code == 200
    refused = http.get("/reports/summary", headers=bearer(secret))
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    assert token_id not in [t["id"] for t in http.get("/admin/tokens", headers=admin).json()]
    bad = http.post("/admin/tokens", headers=admin, json={"name": "x", "scopes": ["superuser"]})
    assert bad.status_code == 422


def test_admin_actions_are_in_the_audit_log_with_who_what_and_the_vector_hash(service):
    http, admin = service["http"], bearer(service["tokens"]["admin"])
    vector = np.random.default_rng(5).normal(size=D_MODEL)
    created = http.post(
        "/admin/concepts",
        headers=admin,
        json={"name": "audited", "layer": 3, "vector": (vector / np.linalg.norm(vector)).tolist()},
    )
    assert created.status_code == 201, created.text
    concept = created.json()
    assert concept["created_by"] == "only-admin"
    assert http.post(f"/admin/concepts/{concept['id']}/deactivate", headers=admin).status_code == 200
    assert http.post(f"/admin/concepts/{concept['id']}/retire", headers=admin).status_code == 200
    # A refused request is not an action: nothing is logged for it.
    assert (
        http.post(f"/admin/concepts/{concept['id']}/activate", headers=bearer(service["tokens"]["client"])).status_code
        == 403
    )

    log = http.get("/admin/audit-log", headers=admin, params={"limit": 50}).json()
    mine = [e for e in log if e["target"] == f"concept:audited:v{concept['version']}"]
    assert [e["action"] for e in mine] == ["concept.retire", "concept.deactivate", "concept.register"]
    admin_prefix = service["tokens"]["admin"].split("_")[1]
    for entry in mine:
        assert entry["actor"] == "only-admin" and entry["actor_prefix"] == admin_prefix
        assert entry["vector_hash"] == concept["vector_hash"]
    only = http.get("/admin/audit-log", headers=admin, params={"action": "concept.register"}).json()
    assert {e["action"] for e in only} == {"concept.register"}


def test_cli_creates_a_working_token_and_the_embedded_default_rotates_its_own(service, tmp_path, monkeypatch):
    from auditor.settings import get_settings

    monkeypatch.setenv("AUDITOR_DATABASE_URL", service["url"])
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["token", "create", "--name", "ci-bot", "--scope", "client", "--quiet"])
        assert result.exit_code == 0, result.output
        secret = result.stdout.strip()
        assert re.fullmatch(r"aud_[0-9a-f]{12}_[A-Za-z0-9_\-]{43}", secret)
        assert service["http"].get("/v1/model", headers=bearer(secret)).status_code == 200
        assert service["http"].get("/reports/summary", headers=bearer(secret)).status_code == 403
        bad = CliRunner().invoke(cli_app, ["token", "create", "--name", "x", "--scope", "root"])
        assert bad.exit_code == 2 and "unknown scope" in bad.output
    finally:
        get_settings.cache_clear()

    data_dir = tmp_path / "fresh-data"  # `auditor run` creates it: private, like the token in it
    first = _embedded_admin_token(service["url"], data_dir)
    second = _embedded_admin_token(service["url"], data_dir)
    assert (data_dir / "admin-token").read_text().strip() == second
    assert (data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert service["http"].get("/admin/tokens", headers=bearer(first)).status_code == 401  # rotated out
    assert service["http"].get("/admin/tokens", headers=bearer(second)).status_code == 200
    engine = make_engine(service["url"])
    try:
        with session_factory(engine)() as session:
            created = session.scalars(select(AdminAction).where(AdminAction.action == "token.create")).all()
            assert {"ci-bot", tokens.EMBEDDED_TOKEN_NAME} <= {row.details["name"] for row in created}
    finally:
        engine.dispose()


def test_malformed_credentials_are_401_not_500(service):
    http = service["http"]
    for header in (
        "Bearer",
        "Bearer x y",
        "Basic dXNlcjpwdw==",
        "Bearer aud__",
        "Bearer aud_" + "x" * 200 + "_y",
        "Bearer not-a-token",
        "Bearer aud_zz_\u00e9",
    ):
        answer = http.get("/reports/summary", headers={"Authorization": header.encode("utf-8")})
        assert answer.status_code == 401, (header, answer.status_code, answer.text)


def test_bad_token_ids_and_audit_log_queries_are_clear_4xx_that_change_nothing(service, monkeypatch):
    from auditor.settings import get_settings

    http, admin = service["http"], bearer(service["tokens"]["admin"])
    before = http.get("/admin/tokens", headers=admin).json()
    log_before = len(http.get("/admin/audit-log", headers=admin, params={"limit": 1000}).json())
    assert http.delete("/admin/tokens/999999", headers=admin).status_code == 404
    assert http.delete("/admin/tokens/0", headers=admin).status_code == 422
    for params in ({"limit": 0}, {"limit": 1001}, {"since": "yesterday"}, {"action": "x" * 65}):
        assert http.get("/admin/audit-log", headers=admin, params=params).status_code == 422, params
    bad_name = http.post("/admin/tokens", headers=admin, json={"name": "", "scopes": ["reader"]})
    no_scope = http.post("/admin/tokens", headers=admin, json={"name": "x", "scopes": []})
    assert bad_name.status_code == no_scope.status_code == 422
    monkeypatch.setenv("AUDITOR_DATABASE_URL", service["url"])
    get_settings.cache_clear()
    try:
        revoked = CliRunner().invoke(cli_app, ["token", "revoke", "999999"])
        assert revoked.exit_code == 2 and "no token with id 999999" in revoked.output
    finally:
        get_settings.cache_clear()
    assert http.get("/admin/tokens", headers=admin).json() == before
    assert len(http.get("/admin/audit-log", headers=admin, params={"limit": 1000}).json()) == log_before


def test_the_audit_log_reads_a_time_without_a_zone_as_utc_like_report_windows(service):
    http, admin = service["http"], bearer(service["tokens"]["admin"])
    created = http.post("/admin/tokens", headers=admin, json={"name": "since-probe", "scopes": ["reader"]})
    assert created.status_code == 201, created.text
    [newest] = http.get("/admin/audit-log", headers=admin, params={"limit": 1}).json()
    at = datetime.fromisoformat(newest["at"]).astimezone(UTC)
    assert newest["target"] == f"token:{created.json()['id']}"

    def ids(since: str) -> list[int]:
        answer = http.get("/admin/audit-log", headers=admin, params={"since": since, "limit": 1000})
        assert answer.status_code == 200, (since, answer.text)
        return [entry["id"] for entry in answer.json()]

    every = [entry["id"] for entry in http.get("/admin/audit-log", headers=admin, params={"limit": 1000}).json()]
    naive_before = (at - timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    naive_after = (at + timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    assert newest["id"] in ids(naive_before) and ids(naive_before) == ids(naive_before + "+00:00")
    assert ids(naive_after) == ids(naive_after + "Z") == []
    assert ids("2024-01-01") == ids("2024-01-01T00:00:00Z") == every  # a date alone: its midnight, UTC
    # Past what a datetime can hold once read as UTC: a 422 naming `since`, not a 500.
    for since in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        answer = http.get("/admin/audit-log", headers=admin, params={"since": since})
        assert answer.status_code == 422, (since, answer.text)
        [detail] = answer.json()["detail"]
        assert detail["loc"] == ["query", "since"] and "outside the times" in detail["msg"], detail


def test_a_bad_log_level_is_refused_before_anything_starts():
    result = CliRunner().invoke(cli_app, ["api", "--log-level", "loud", "--no-migrate"])
    assert result.exit_code == 2 and "choose one of critical" in result.output


@pytest.mark.parametrize("docs", [True, False])
def test_the_api_documentation_is_public_only_when_the_deployment_serves_it(tmp_path, docs):
    databases = Databases("sqlite", tmp_path)
    url = databases.new_url()
    run_migrations(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path / "data", api_docs=docs))
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
        statuses = {path: http.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")}
        assert http.get("/healthz").status_code == 200
    assert statuses == dict.fromkeys(statuses, 200 if docs else 404), statuses
    assert app.openapi()["paths"]  # the document itself is still built (tests and tools use it)


def test_the_token_commands_print_names_and_errors_as_text_not_markup(service, monkeypatch):
    """A token name and an error message are the operator's text: `[/x]` is shown, not parsed
    (rich would raise), and a control character is spelled out, not sent to the terminal."""
    from auditor.settings import get_settings

    monkeypatch.setenv("AUDITOR_DATABASE_URL", service["url"])
    get_settings.cache_clear()
    try:
        bad = CliRunner().invoke(cli_app, ["token", "create", "--name", "x", "--scope", "[/x]\x1b[31m"])
        assert bad.exit_code == 2, bad.output
        assert "unknown scope(s) [/x]\\x1b[31m;" in bad.output and "\x1b" not in bad.output, bad.output
        made = CliRunner().invoke(
            cli_app, ["token", "create", "--name", "[bold]ops[/bold]\x07", "--scope", "reader", "--quiet"]
        )
        assert made.exit_code == 0, made.output
        listed = CliRunner().invoke(cli_app, ["token", "list"], env={"COLUMNS": "200"})
        assert listed.exit_code == 0, listed.output
        assert "[bold]ops[/bold]\\x07" in listed.output and "\x07" not in listed.output, listed.output
    finally:
        get_settings.cache_clear()


def test_the_embedded_token_waits_for_a_writer_instead_of_failing_startup(tmp_path):
    """`auditor run` issues its token while the in-process worker's threads may be writing
    (retention, drift, a first request). A writer that commits between the token's read (revoking
    the last run's) and its insert made startup exit 1 with "database is locked"; the token's
    transaction now takes the write lock up front and waits its turn."""
    import sqlite3
    import threading
    import time

    from auditor.db.engine import run_migrations

    db_path = tmp_path / "auditor.db"
    url = f"sqlite:///{db_path}"
    run_migrations(url)
    writer = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO admin_audit_log (actor, action, target, details, at) VALUES "
                   "('worker', 'retention.run', 'x', '{}', '2026-01-01')")  # fmt: skip
    threading.Timer(1.0, lambda: writer.execute("COMMIT")).start()  # commits while the token waits
    started = time.monotonic()
    token = _embedded_admin_token(url, tmp_path / "data")
    assert time.monotonic() - started >= 0.9  # it waited for the writer
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            assert tokens.authenticate(session, token) is not None
    finally:
        engine.dispose()
        writer.close()
