"""Liveness and readiness. Both are public (no token: probes and load balancers call them), so
what they say is generic: which dependency failed and the kind of failure, never its message
(a connection error names hosts and users); the message goes to the log."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from auditor.api.deps import FingerprintDep
from auditor.api.schemas import Health, ModelRead
from auditor.errors import NoLiveWorker
from auditor.queue.dispatch import CeleryDispatcher
from auditor.queue.heartbeat import HeartbeatReader, is_redis

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
model_router = APIRouter(tags=["model"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (no dependencies checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
def readyz(request: Request, response: Response) -> Health:
    """Ready to take traffic: the database answers and, with a broker configured, the broker
    answers and at least one worker replies to a ping."""
    checks = {"database": _check("database", lambda: _database(request))}
    dispatcher = request.app.state.dispatcher
    if isinstance(dispatcher, CeleryDispatcher):
        checks["broker"] = _check("broker", lambda: _broker(dispatcher))
        checks["workers"] = (
            _check("workers", lambda: _workers(request, dispatcher))
            if checks["broker"] == "ok"
            else "unknown: broker down"
        )
    elif dispatcher is not None:
        runtime = getattr(dispatcher, "runtime", None)
        checks["workers"] = _warm_up_state(runtime.state.snapshot(), "in-process") if runtime else "ok (in-process)"
    else:
        checks["workers"] = "none configured"
    ready = all(v.startswith("ok") for v in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(status="ready" if ready else "not ready", checks=checks)


def _check(what: str, probe) -> str:
    try:
        return probe() or "ok"
    except NoLiveWorker as exc:  # our own words, nothing of the environment in them
        return f"error: {exc}"
    except Exception as exc:  # any failure means "not ready": reported, not raised
        log.warning("readiness: %s check failed: %s: %s", what, type(exc).__name__, exc)
        return f"error: {type(exc).__name__} (details in the API log)"


def _database(request: Request) -> None:
    # A read session: a probe must not queue for (or hold back) SQLite's write lock.
    with request.app.state.read_sessions() as session:
        session.execute(text("SELECT 1"))


def _broker(dispatcher: CeleryDispatcher) -> None:
    with dispatcher.app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _warm_up_state(snapshot: dict, who: str) -> str:
    """ "ok (...)" once a worker serves; otherwise what it is doing, with counts."""
    if snapshot.get("ready"):
        return f"ok ({who})"
    step = f", {snapshot['step']} {snapshot['done']}/{snapshot['total']}" if snapshot.get("step") else ""
    return f"warming up ({who}): {snapshot.get('phase', 'starting')}{step}, {snapshot.get('seconds', 0):.0f}s so far"


def _workers(request: Request, dispatcher: CeleryDispatcher) -> str:
    url = dispatcher.settings.result_backend or dispatcher.settings.broker_url
    if not is_redis(url):  # heartbeats live in Redis; other brokers are asked directly
        replies = dispatcher.app.control.ping(timeout=1.0)
        if not replies:
            raise NoLiveWorker("no worker replied to a ping within 1s")
        return f"ok ({len(replies)} live)"
    reader = getattr(request.app.state, "heartbeats", None)
    if reader is None:
        reader = request.app.state.heartbeats = HeartbeatReader(url)
    beats = reader.workers()
    if not beats:
        raise NoLiveWorker("no live worker heartbeat")
    ready = [b for b in beats if b.get("ready")]
    if ready:
        return f"ok ({len(ready)} ready of {len(beats)} live)"
    newest = max(beats, key=lambda b: b.get("at", 0))
    return _warm_up_state(newest, f"0 ready of {len(beats)} live")


@model_router.get("/v1/model", response_model=ModelRead)
def model(fingerprint: FingerprintDep) -> ModelRead:
    """The served model and the fingerprint every registered vector must match."""
    return ModelRead(**fingerprint.as_dict(), fingerprint=fingerprint.hash)
