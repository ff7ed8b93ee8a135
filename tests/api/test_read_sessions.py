"""Read-only routes never take SQLite's write lock (the embedded default).

Writers' sessions begin IMMEDIATE on SQLite (auditor.db.engine.writer_engine): the write lock is
taken up front and held to the end of the transaction. A report or a listing on such a session
would hold it for as long as it reads, and a worker recording an answer already served to its
caller would wait out busy_timeout and fail: the answer never recorded. Under WAL a deferred
read transaction and the one writer proceed together. Both sides are checked here with a busy
timeout of one second, standing for a report that runs longer than the real 30 s."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import event, func, select

from auditor.api.main import create_app
from auditor.db import store
from auditor.db.engine import make_engine, run_migrations, session_factory, writer_engine
from auditor.db.enums import JobKind, RequestKind, RequestStatus
from auditor.db.models import MonitoredRequest, RequestScore
from auditor.reports import queries
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.http_server import serving
from workers.serving.transactions import in_transaction

BUSY_TIMEOUT_MS = 1000  # how long a blocked connection waits for the write lock before failing
D_MODEL, LAYERS = 8, (3, 5)
AUDIT_ID = "audit-read-0001"


def _short_busy_timeout(engine) -> None:
    # Runs after make_engine's own connect hook (listeners run in order), overriding its 30 s.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> dict:
    """A migrated SQLite file with one concept, one audited request and one job."""
    path = tmp_path_factory.mktemp("read-sessions") / "auditor.db"
    url = f"sqlite:///{path}"
    run_migrations(url)
    engine = make_engine(url)
    with session_factory(engine)() as session:
        concept = store.add_concept_version(
            session, name="doom", vectors={layer: [1.0] * D_MODEL for layer in LAYERS}, primary_layer=LAYERS[0],
            created_by="test", model_id="org/model", model_fingerprint="ab" * 32, loader="test",
            hook_point="blocks.{layer}.hook_resid_post", d_model=D_MODEL, n_layers_model=30,
            method="mean_diff", pooling="mean", source="pairs",
        )  # fmt: skip
        store.create_request(session, request_id=AUDIT_ID, kind=RequestKind.AUDIT, prompt_text="hello")
        job = store.create_job(session, kind=JobKind.CALIBRATE, payload={})
        session.commit()
        ids = {"concept_id": concept.id, "job_id": job.id}
    engine.dispose()
    return {"url": url, "path": path, "token": issue_token(url, name="read-sessions"), **ids}


@pytest.fixture(scope="module")
def api(database, tmp_path_factory) -> Iterator[httpx.Client]:
    app = create_app(Settings(database_url=database["url"], data_dir=tmp_path_factory.mktemp("data")))
    _short_busy_timeout(app.state.engine)  # before the server opens its first connection
    headers = bearer(database["token"])
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:
        yield client


def _worker(database, tmp_path) -> SimpleNamespace:
    """What workers.serving.transactions.in_transaction needs, as a worker holds it: writer
    sessions (BEGIN IMMEDIATE), and no retry, so a write refused for the lock fails at once."""
    engine = make_engine(database["url"])
    _short_busy_timeout(engine)
    return SimpleNamespace(
        engine=engine,
        settings=Settings(database_url=database["url"], data_dir=tmp_path, db_retry_seconds=0),
        sessions=session_factory(writer_engine(engine)),
    )


def _record_request(worker, request_id: str, concept_id: int) -> None:
    """The rows a served answer leaves, in the transactions the serving path uses: the request
    queued (the API), started, then its scores and DONE in one (workers.serving.generation)."""
    in_transaction(
        worker,
        lambda s: store.create_request(s, request_id=request_id, kind=RequestKind.CHAT, prompt_text="hi"),
        f"queueing {request_id}",
    )

    def start(session) -> None:
        store.get_request(session, request_id=request_id, for_update=True)
        store.mark_request(session, request_id=request_id, status=RequestStatus.RUNNING)

    def record(session) -> None:
        store.get_request(session, request_id=request_id, for_update=True)
        rows = [
            {"concept_id": concept_id, "layer": layer, "mean": 0.1, "max": 0.2, "last": 0.1, "n_tokens": 4}
            for layer in LAYERS
        ]
        store.insert_scores_copy(session, request_id=request_id, rows=rows)
        store.mark_request(session, request_id=request_id, status=RequestStatus.DONE, completion_text="ho")

    in_transaction(worker, start, f"starting {request_id}")
    in_transaction(worker, record, f"recording {request_id}")


def test_scores_are_recorded_while_a_report_is_being_read(api, database, tmp_path, monkeypatch):
    """A report stopped halfway through its reads, its transaction open; meanwhile a worker
    records five served requests with their scores. Every write commits at once, while the
    report is still open, and the report then finishes."""
    inside, release = threading.Event(), threading.Event()
    resolve = queries.resolve_concepts

    def slow_resolve(session, **kwargs):
        refs = resolve(session, **kwargs)  # the report's first reads: its transaction has begun
        inside.set()
        release.wait(timeout=30)
        return refs

    monkeypatch.setattr(queries, "resolve_concepts", slow_resolve)
    answered: dict = {}
    report = threading.Thread(target=lambda: answered.update(r=api.get("/reports/summary", params={"since": "7d"})))
    report.start()
    worker = _worker(database, tmp_path)
    ids = [f"served-{n:04d}" for n in range(5)]
    took, failed = [], None
    try:
        assert inside.wait(timeout=10), "the report never reached its reads"
        for request_id in ids:
            started = time.monotonic()
            _record_request(worker, request_id, database["concept_id"])
            took.append(time.monotonic() - started)
        still_reading = report.is_alive() and not release.is_set()
    except Exception as exc:  # reported below with the timings, after the report is let go
        failed, still_reading = exc, report.is_alive()
    finally:
        release.set()
        report.join(timeout=30)
    assert failed is None, f"a write failed while the report was open: {type(failed).__name__}: {failed}"
    assert still_reading, "the writes must have happened while the report's transaction was open"
    assert max(took) < BUSY_TIMEOUT_MS / 1000, f"writes waited for the report: {took}"
    assert answered["r"].status_code == 200, answered["r"].text
    assert [row["concept"] for row in answered["r"].json()["rows"]] == ["doom"]

    with session_factory(worker.engine)() as session:
        done = session.scalars(
            select(MonitoredRequest.id).where(
                MonitoredRequest.id.in_(ids), MonitoredRequest.status == RequestStatus.DONE
            )
        )
        assert sorted(done) == ids
        n_scores = session.scalar(select(func.count()).where(RequestScore.request_id.in_(ids)))
        assert n_scores == len(ids) * len(LAYERS)
    worker.engine.dispose()


def _get_paths(api: httpx.Client, database: dict) -> list[str]:
    """Every GET route the app publishes, its path parameters filled with rows that exist."""
    model_id = api.get("/v1/models").json()["data"][0]["id"]
    values = {"concept_id": database["concept_id"], "job_id": database["job_id"], "audit_id": AUDIT_ID}
    values["model_id"] = model_id
    paths = api.get("/openapi.json").json()["paths"]
    return [path.format(**values) for path, operations in paths.items() if "get" in operations]


def test_every_read_only_route_answers_while_another_connection_writes(api, database):
    """The write lock held by another connection (as a worker holds it while it records): every
    GET route still answers, from the last committed state, instead of waiting for the lock; a
    write route still waits for it."""
    paths = _get_paths(api, database)
    assert len(paths) >= 20 and "/reports/html" in paths and "/readyz" in paths
    writer = sqlite3.connect(database["path"], isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the write lock, until rolled back
        writer.execute("UPDATE concepts SET description = 'being written' WHERE id = ?", (database["concept_id"],))
        answers = {path: api.get(path) for path in paths}
        # Writes still take the lock up front: this one waits out the busy timeout, then is refused.
        write = api.post("/admin/tokens", json={"name": "while-locked", "scopes": ["reader"]})
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    # /readyz is a 503 all the same (this app has no worker): its database check is what counts.
    refused = {
        path: r.json()["checks"]["database"] if path == "/readyz" else f"{r.status_code} {r.text[:80]}"
        for path, r in answers.items()
        if (path == "/readyz" and r.json()["checks"]["database"] != "ok")
        or (path != "/readyz" and r.status_code != 200)
    }
    assert refused == {}
    assert write.status_code == 503 and "while-locked" not in api.get("/admin/tokens").text
    assert answers[f"/admin/concepts/{database['concept_id']}"].json()["description"] == ""
    assert answers[f"/v1/audits/{AUDIT_ID}"].json()["status"] == RequestStatus.QUEUED
