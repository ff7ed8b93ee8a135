"""`auditor.api.main:app`, built by `create_app()`."""

from __future__ import annotations

import threading
from functools import lru_cache

import anyio
from fastapi import FastAPI

from auditor import __version__, privacy
from auditor.api.admission import InFlight
from auditor.api.errors import install_error_handlers
from auditor.api.limits import install_request_guard
from auditor.api.openai import router as completions
from auditor.api.routes import audits, concepts, health, jobs, reports, tokens
from auditor.api.security import require
from auditor.db.engine import database_url, make_engine, session_factory, writer_engine
from auditor.model_identity import ModelFingerprint, describe_model
from auditor.queue.dispatch import CeleryDispatcher, Dispatcher
from auditor.queue.streams import redis_streams
from auditor.settings import Settings, get_settings
from auditor.telemetry import metrics

# Completion threads when the admission bound is off (max_concurrent_requests = 0).
UNBOUNDED_WAITS = 1024


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Everything the app needs is built here from settings; nothing happens at import.

    `dispatcher` hands generation to a worker: Celery over the broker when AUDITOR_BROKER_URL is
    set; the composition root passes an in-process one for the embedded default."""
    settings = settings or get_settings()
    # Outside full mode no log line of this process carries what the mode does not store.
    privacy.install_log_redaction(settings.privacy_mode)
    if dispatcher is None and settings.broker_url:
        dispatcher = CeleryDispatcher(settings)
    docs = settings.api_docs  # the only routes besides the probes that answer without a token
    app = FastAPI(
        title="Auditor",
        version=__version__,
        description="Monitor what a served language model represents internally.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    engine = make_engine(database_url(settings))
    app.state.settings = settings
    app.state.engine = engine
    # Handlers read, then write (check, then insert): on SQLite their transactions must take the
    # write lock up front (see auditor.db.engine.writer_engine). No effect on Postgres.
    app.state.sessions = session_factory(writer_engine(engine))
    # Routes that only read (ReadSessionDep), authentication and /readyz: plain deferred
    # transactions, which under WAL never wait for the writer nor hold it back.
    app.state.read_sessions = session_factory(engine)
    app.state.dispatcher = dispatcher
    # Where streamed requests' tokens arrive: the in-process worker's channel, or the broker's Redis.
    app.state.streams = getattr(dispatcher, "streams", None) or redis_streams(settings)
    app.state.in_flight = InFlight(settings.max_concurrent_requests, settings.max_concurrent_per_token)
    # The completions' own threads (auditor.api.openai.serving.off_loop): one per admitted request.
    app.state.completion_threads = anyio.CapacityLimiter(settings.max_concurrent_requests or UNBOUNDED_WAITS)

    fingerprint_lock = threading.Lock()

    @lru_cache(maxsize=1)
    def described() -> ModelFingerprint:
        # From metadata only: the API process never loads weights (DESIGN.md).
        return describe_model(settings.model)

    def fingerprint() -> ModelFingerprint:
        # Once, under a lock: a burst of first requests would otherwise each read the weights
        # file's metadata at once (seconds apiece on a busy CPU).
        with fingerprint_lock:
            return described()

    app.state.fingerprint = fingerprint
    install_error_handlers(app)
    install_request_guard(app, settings)  # 413 before an oversized body is read; 422 for a NUL in path/query
    # Every route needs a token with its router's scope, except the probes and /metrics
    # (auditor.api.security.PUBLIC_PATHS); tests walk the OpenAPI route list to hold this.
    admin, client, reader = require("admin"), require("client"), require("reader")
    app.include_router(health.router)
    app.include_router(health.model_router, dependencies=[client])
    app.include_router(concepts.router, dependencies=[admin])
    app.include_router(jobs.router, dependencies=[admin])
    app.include_router(tokens.router, dependencies=[admin])
    app.include_router(completions.router, dependencies=[client])
    app.include_router(audits.router, dependencies=[client])
    # add_route, not mount: a mount answers every scrape of /metrics with a redirect to /metrics/.
    app.add_route("/metrics", metrics.metrics_asgi_app(settings.broker_url), include_in_schema=False)
    app.include_router(reports.router, dependencies=[reader])
    return app


def __getattr__(name: str):
    # `auditor.api.main:app` for uvicorn, built on first access rather than at import time, so
    # importing this module (tests, the CLI) never touches a database.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
