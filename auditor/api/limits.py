"""Input limits the deployment sets (auditor/settings.py, "input limits"): the request body size,
enforced while the body arrives, and the checks on a parsed body that depend on settings; and the
one check on a request's path and query made before any route sees them (no NUL). The OpenAI
bodies' own checks (tokens, prompt size) are in auditor.api.openai.serving, built from the
helpers here. The fixed shapes (types, ranges, hard ceilings, storable text) are in
auditor.schemas and the bodies' models; vector math in probes/validation.py."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auditor.api.errors import error_body
from auditor.api.schemas import AuditCreate, ExtractionCreate
from auditor.settings import Settings

UPLOAD_PATH = "/admin/concepts/upload"


class RequestTooLarge(HTTPException):
    """The body passed its limit. An HTTPException, so FastAPI's body parsing lets it through
    (it turns any other exception into a generic 400) and auditor.api.errors answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413, detail=f"request body is larger than this deployment's limit of {limit:,} bytes"
        )
        self.limit = limit


class RequestGuard:
    """ASGI middleware, before the app runs.

    - A NUL in the path or query string is a 422: no route can use one, and Postgres cannot
      even compare text with it (the query would fail: a 500).
    - A declared Content-Length over the body limit is a 413 before a byte is read; a body
      without one (chunked) is counted as it arrives and refused as soon as it passes the limit,
      so nothing ever buffers more than the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_max_bytes: int) -> None:
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
            where = "path" if "\x00" in scope["path"] else "query"
            body = error_body(f"the {where} contains a NUL character (%00)", "value_error", (where,))
            await JSONResponse(body, status_code=422)(scope, receive, send)
            return
        limit = self.upload_max_bytes if scope["path"].rstrip("/") == UPLOAD_PATH else self.max_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(scope, receive, send, limit)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except RequestTooLarge:
            # Read outside FastAPI's body parsing (whose handler answers it): answer it here.
            if started:
                raise
            await _too_large(scope, receive, send, limit)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    body = error_body(RequestTooLarge(limit).detail, "request_too_large")
    await JSONResponse(body, status_code=413)(scope, receive, send)


def install_request_guard(app, settings: Settings) -> None:
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes, upload_max_bytes=settings.max_upload_bytes)


# ---- checks on a parsed body that depend on settings: 422 in FastAPI's own shape ----


def limit_error(loc: tuple[Any, ...], kind: str, msg: str, value: Any = None) -> dict:
    """One entry of a 422's `detail`, at `loc` inside the body."""
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


def refuse(errors: list[dict]) -> None:
    """422 with every error found, if any."""
    if errors:
        raise RequestValidationError(errors)


def too_many_chars(loc: tuple[Any, ...], what: str, texts: Iterable[str], settings: Settings) -> list[dict]:
    total, limit = sum(len(text) for text in texts), settings.max_prompt_chars
    if total <= limit:
        return []
    return [limit_error(loc, "too_long", f"{what} has {total:,} characters; this deployment accepts at most {limit:,}")]


def check_audit(body: AuditCreate, settings: Settings) -> None:
    if len(body.items) > settings.max_audit_items:
        refuse(
            [
                limit_error(
                    ("items",),
                    "too_long",
                    f"{len(body.items)} items; this deployment accepts at most {settings.max_audit_items} per submission",
                )
            ]
        )
    errors = []
    for index, item in enumerate(body.items):
        texts = [item.prompt or "", *(m.content for m in item.messages or []), item.completion]
        errors += too_many_chars(
            ("items", index), f"items[{index}] (prompt or messages, plus completion)", texts, settings
        )
    refuse(errors)


def check_extraction(body: ExtractionCreate, settings: Settings) -> None:
    if len(body.pairs) > settings.max_pairs:
        refuse(
            [
                limit_error(
                    ("pairs",),
                    "too_long",
                    f"{len(body.pairs)} pairs; this deployment accepts at most {settings.max_pairs} per extraction",
                )
            ]
        )
