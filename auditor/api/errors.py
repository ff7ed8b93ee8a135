"""One JSON error shape for every failure, matching FastAPI's own 422 body:
{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}."""

from __future__ import annotations

import json
import math
import re

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException

from auditor.api.schemas import ErrorBody
from auditor.errors import (
    AuditorError,
    AuthenticationError,
    IdempotencyConflict,
    InvalidInputError,
    ModelLoadError,
    NotFoundError,
    PermissionDeniedError,
    TooManyRequests,
    WindowError,
)


def error_body(message: str, kind: str, loc: tuple[str, ...] = ("body",)) -> dict:
    """FastAPI's `detail` list, plus OpenAI's `error` object so OpenAI clients show the message."""
    message = _json_safe(message)
    return {
        "detail": [{"loc": list(loc), "msg": message, "type": kind}],
        "error": {"message": message, "type": kind, "param": loc[-1] if len(loc) > 1 else None, "code": kind},
    }


def query_error(exc: WindowError, value: object) -> RequestValidationError:
    """A time parameter that cannot be used, as FastAPI's own 422 at ["query", <its name>]."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", exc.field), "msg": exc.reason, "input": value}]
    )


RETRY_AFTER_SECONDS = 5
ECHO_CHARS = 200  # of an offending input a 422 quotes back (the field, the limit and the rest are whole)
_SURROGATE = re.compile("[\ud800-\udfff]")

# Starlette's and FastAPI's own HTTP errors (unknown path, wrong method, body over its limit, …):
# status -> (type, where).
HTTP_ERRORS = {
    400: ("bad_request", "body"),
    401: ("unauthorized", "header"),
    403: ("forbidden", "header"),
    404: ("not_found", "path"),
    405: ("method_not_allowed", "path"),
    413: ("request_too_large", "body"),
    415: ("unsupported_media_type", "body"),
}


def unavailable(exc: Exception) -> JSONResponse:
    """503 with Retry-After: the broker or every worker is away; the client should try again."""
    return JSONResponse(
        error_body(str(exc), "worker_unavailable", ("server",)),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _json_safe([_cut_input(error) for error in jsonable_encoder(exc.errors())])
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in detail)
        error = {"message": summary, "type": "invalid_request_error", "param": None, "code": "validation_error"}
        return JSONResponse({"detail": detail, "error": error}, status_code=422)

    @app.exception_handler(AuthenticationError)
    async def _unauthenticated(request: Request, exc: AuthenticationError) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc), "unauthorized", ("header", "authorization")),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(PermissionDeniedError)
    async def _forbidden(request: Request, exc: PermissionDeniedError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "forbidden", ("header", "authorization")), status_code=403)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "not_found", ("path",)), status_code=404)

    @app.exception_handler(IdempotencyConflict)
    async def _idempotency(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        body = error_body(str(exc), "idempotency_conflict", ("header", "idempotency-key"))
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_input"), status_code=422)

    @app.exception_handler(TooManyRequests)
    async def _too_many(request: Request, exc: TooManyRequests) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc), "rate_limit_exceeded", ("server",)),
            status_code=429,
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(ModelLoadError)
    async def _model(request: Request, exc: ModelLoadError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "model_unavailable", ("server",)), status_code=503)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_away(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is unreachable, restarting or refusing connections: a condition that
        # passes, like a broker outage, so 503 + Retry-After rather than a bare 500.
        message = "the database is unavailable; retry shortly"
        return JSONResponse(
            error_body(message, "database_unavailable", ("server",)),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(AuditorError)
    async def _auditor(request: Request, exc: AuditorError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", ("server",)), status_code=500)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if (parse_error := _unparseable_body(request, exc)) is not None:
            return parse_error
        kind, where = HTTP_ERRORS.get(exc.status_code, ("http_error", "server"))
        return JSONResponse(
            error_body(str(exc.detail), kind, (where,)), status_code=exc.status_code, headers=exc.headers
        )

    _document_errors(app)


def _cut_input(error: dict) -> dict:
    """A 422 quotes back the offending input (FastAPI's `input`): whole when short, else its first
    ECHO_CHARS characters (a non-string as its JSON text) with a marker giving its full length.
    Whole, a 200,000-character prompt came back in the body, and so into every log and proxy."""
    value = error.get("input")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) <= ECHO_CHARS:
        return error
    return {**error, "input": f"{text[:ECHO_CHARS]}… (cut: {len(text):,} characters)"}


def _json_safe(value):
    """What a 4xx echoes back (the offending input, a name in a message) as strict JSON: NaN and
    infinities as text, unpaired surrogates escaped. Otherwise encoding the 422 itself fails: a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _unparseable_body(request: Request, exc: HTTPException) -> JSONResponse | None:
    """FastAPI answers a body it cannot decode with a bare 400 "There was an error parsing the
    body" (a JSON syntax error alone gets its 422). Say what was wrong, as that 422: invalid
    UTF-8, an integer of more than 4300 digits, nesting too deep for the parser."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, (ValueError, RecursionError)):
        return None
    if isinstance(cause, UnicodeDecodeError):
        message = (
            f"the request body is not valid UTF-8: {cause.reason} "
            f"(byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
        )
    elif isinstance(cause, RecursionError):
        message = "the request body is nested too deeply to parse"
    else:
        message = f"the request body could not be parsed: {cause}"[:500]
    json_body = "json" in request.headers.get("content-type", "")
    kind = "json_invalid" if json_body else "body_invalid"
    return JSONResponse(error_body(message, kind), status_code=422)


def _document_errors(app: FastAPI) -> None:
    """Publish the error shape in the OpenAPI document: every operation may answer 4XX with an
    ErrorBody (401/403 auth, 404, 413, 422 …), so clients and schema-driven tests know it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # caches itself in app.openapi_schema; completed in place below
            error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(error_schema.pop("$defs", {}))
            components["ErrorBody"] = error_schema
            response = {
                "description": "Client error: what was wrong, in FastAPI's shape plus OpenAI's `error`",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    if isinstance(operation, dict) and "responses" in operation:
                        operation["responses"].setdefault("4XX", response)
        return app.openapi_schema

    app.openapi = openapi
