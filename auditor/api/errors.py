"""One JSON error shape for every failure, matching FastAPI's own 422 body:
{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from auditor.errors import AuditorError, ModelLoadError
from auditor.store import NotFoundError
from probes.errors import InvalidInputError


def error_body(message: str, kind: str, loc: tuple[str, ...] = ("body",)) -> dict:
    """FastAPI's `detail` list, plus OpenAI's `error` object so OpenAI clients show the message."""
    return {
        "detail": [{"loc": list(loc), "msg": message, "type": kind}],
        "error": {"message": message, "type": kind, "param": loc[-1] if len(loc) > 1 else None, "code": kind},
    }


RETRY_AFTER_SECONDS = 5


def unavailable(exc: Exception) -> JSONResponse:
    """503 with Retry-After: the broker or every worker is away; the client should try again."""
    return JSONResponse(error_body(str(exc), "worker_unavailable", ("server",)), status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = jsonable_encoder(exc.errors())
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in detail)
        error = {"message": summary, "type": "invalid_request_error", "param": None, "code": "validation_error"}
        return JSONResponse({"detail": detail, "error": error}, status_code=422)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "not_found", ("path",)), status_code=404)

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_input"), status_code=422)

    @app.exception_handler(ModelLoadError)
    async def _model(request: Request, exc: ModelLoadError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "model_unavailable", ("server",)), status_code=503)

    @app.exception_handler(AuditorError)
    async def _auditor(request: Request, exc: AuditorError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", ("server",)), status_code=500)
