"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from auditor.api.deps import FingerprintDep
from auditor.schemas import Health, ModelRead

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (no dependencies checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
def readyz(request: Request, response: Response) -> Health:
    """Ready to take traffic: the database answers. (Broker and worker checks arrive with the
    Celery workers.)"""
    checks = {}
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready", reported, not raised
        checks["database"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(status="ready" if ready else "not ready", checks=checks)


@router.get("/v1/model", response_model=ModelRead, tags=["model"])
def model(fingerprint: FingerprintDep) -> ModelRead:
    """The served model and the fingerprint every registered vector must match."""
    return ModelRead(**fingerprint.as_dict(), fingerprint=fingerprint.hash)
