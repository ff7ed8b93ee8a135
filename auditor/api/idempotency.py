"""`Idempotency-Key` on completions and audits: a client's retry is the request it already made.

A client that lost the response (a timeout, a dropped connection) and sends the same request
again with the same key gets the same request back, not a second one: the same ids, and for a
completion the recorded answer (the worker answers a request it has recorded with its record;
one still running is waited for; one that failed runs again). Keys are per token and per route:
the row stores sha256(token id, route, key, prompt index), never the key itself. The same key
with a different body is a 422; a second call racing the first, before its rows are written, a
409 (retry). Keys last as long as their requests (retention).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import Header
from pydantic import BaseModel
from sqlalchemy.orm import Session

from auditor.db import store
from auditor.db.models import MonitoredRequest
from auditor.errors import IdempotencyConflict

MAX_KEY_CHARS = 255
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="retrying with the same key returns the request already made, not a second one",
        # Out of the OpenAPI document: schema fuzzers (schemathesis) take a header whose name
        # ends in "Key" for a credential and report every request it does not refuse as
        # "accepts invalid authentication". Documented in the README instead.
        include_in_schema=False,
    ),
]
# Where the request's own digest is kept with it (in `params`): what a reuse is compared with.
DIGEST = "request_sha256"


def request_digest(body: BaseModel) -> str:
    """The body as a retry must repeat it (whether it streams aside)."""
    fields = body.model_dump(mode="json", exclude={"stream", "stream_options"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def row_keys(token_id: int, route: str, key: str, count: int) -> list[str]:
    """The stored key of each of a request's `count` rows."""
    return [hashlib.sha256(f"{token_id}\0{route}\0{key}\0{index}".encode()).hexdigest() for index in range(count)]


def earlier_requests(session: Session, keys: list[str], digest: str) -> list[MonitoredRequest] | None:
    """The rows an earlier call with this key made, in order; None when it made none."""
    found = store.requests_by_idempotency_key(session, keys=keys)
    if not found:
        return None
    rows = [found.get(key) for key in keys]
    if any(row is None or (row.params or {}).get(DIGEST) != digest for row in rows):
        raise IdempotencyConflict(
            "this Idempotency-Key was used for a different request: use a new key for a new request"
        )
    return rows


def racing() -> IdempotencyConflict:
    return IdempotencyConflict(
        "a request with this Idempotency-Key is being accepted right now: retry in a moment", status=409
    )
