"""What the OpenAI routes do, after FastAPI has parsed the body: the deployment's own checks, the
request row and its task, the wait for a worker, and the worker's result as the OpenAI response
(chat and text completions differ only in the shape of their one choice)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.api import dispatching, idempotency
from auditor.api.admission import Admission
from auditor.api.errors import error_body
from auditor.api.limits import limit_error, refuse, too_many_chars
from auditor.api.openai import responses
from auditor.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionCreate,
    Completion,
    CompletionCreate,
    Model,
)
from auditor.api.openai.streaming import StreamedRequest, stream_response
from auditor.db import store
from auditor.db.enums import PrivacyMode, RequestKind
from auditor.model_identity import ModelFingerprint
from auditor.queue.dispatch import TASK_GENERATE
from auditor.settings import Settings

MODEL_ALIASES = ("auditor", "default")
T = TypeVar("T")

Body = ChatCompletionCreate | CompletionCreate

# ---- checks on the parsed body that depend on the deployment: 422, or 404 / 400 ----


def _tokens(body: Body, settings: Settings) -> list[dict]:
    limit = settings.max_tokens_limit
    return [
        limit_error((field,), "less_than_equal", f"{field} is {value}; this deployment allows at most {limit}", value)
        for field in ("max_tokens", "max_completion_tokens")
        if (value := getattr(body, field, None)) is not None and value > limit
    ]


def check_chat(body: ChatCompletionCreate, settings: Settings) -> None:
    refuse(
        _tokens(body, settings)
        + too_many_chars(("messages",), "the messages together", (m.content for m in body.messages), settings)
    )


def check_completion(body: CompletionCreate, settings: Settings) -> None:
    texts = [prompt for prompt in body.prompts if isinstance(prompt, str)]
    refuse(_tokens(body, settings) + too_many_chars(("prompt",), "the prompt", texts, settings))


# When this API process started: the `created` of the one model it lists (OpenAI's field is the
# model's creation time, which a local weights file does not record).
STARTED = int(time.time())


def serves(name: str, fingerprint: ModelFingerprint, settings: Settings) -> bool:
    """Whether a request naming `name` is for the served model."""
    return name in (fingerprint.model_id, settings.model, *MODEL_ALIASES)


def model_card(fingerprint: ModelFingerprint) -> Model:
    return Model(id=fingerprint.model_id, created=STARTED, owned_by="auditor")


def _unknown_model(name: str, fingerprint: ModelFingerprint, settings: Settings) -> JSONResponse | None:
    if serves(name, fingerprint, settings):
        return None
    message = f"unknown model {name!r}: this deployment serves {fingerprint.model_id!r}"
    return JSONResponse(error_body(message, "model_not_found", ("body", "model")), status_code=404)


def _unknown_concepts(session: Session, body: Body) -> JSONResponse | None:
    wanted = body.auditor.concepts if body.auditor else None
    if not wanted:
        return None
    active = {c.name for c in store.list_concepts(session, active=True)}
    unknown = sorted(set(wanted) - active)
    if not unknown:
        return None
    message = (
        f"unknown or inactive concept(s) {', '.join(map(repr, unknown))}; active concepts: {', '.join(sorted(active))}"
    )
    return JSONResponse(error_body(message, "concept_not_found", ("body", "auditor", "concepts")), status_code=404)


def rejected(session: Session, body: Body, fingerprint: ModelFingerprint, settings: Settings) -> JSONResponse | None:
    """Checks both completion routes make before anything is written or queued."""
    if (error := _unknown_model(body.model, fingerprint, settings)) is not None:
        return error
    if (error := _unknown_concepts(session, body)) is not None:
        return error
    if (unsupported := body.unsupported()) is not None:
        param, why = unsupported
        message = f"{param}: {why}"
        return JSONResponse(error_body(message, "unsupported_parameter", ("body", param)), status_code=400)
    return None


# ---- the request row and its task ----


@dataclass(frozen=True)
class Generation:
    """A request as it is recorded and queued: the row's id, kind and prompt text, and the
    payload the worker generates from."""

    request_id: str
    kind: RequestKind
    prompt_text: str
    payload: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # kept with the row beside the sampling
    idempotency_key: str | None = None  # the row's stored key (auditor.api.idempotency)


def chat_generation(body: ChatCompletionCreate, settings: Settings) -> list[Generation]:
    messages = [m.model_dump() for m in body.messages]
    sampling = body.sampling(settings.max_new_tokens)
    if body.max_completion_tokens:
        sampling["max_new_tokens"] = body.max_completion_tokens
    # Kept only where the text is kept anyway: a traffic calibration replays the messages
    # through the chat template (the joined prompt_text cannot be re-templated).
    params = {"messages": messages} if settings.privacy_mode == PrivacyMode.FULL else {}
    generation = Generation(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        kind=RequestKind.CHAT,
        prompt_text="\n".join(f"{m['role']}: {m['content']}" for m in messages),
        payload={"messages": messages, "sampling": sampling},
        params=params,
    )
    return [generation]


def completion_generations(body: CompletionCreate, settings: Settings) -> list[Generation]:
    """One request row per prompt: a list of n prompts is n monitored requests, answered as the
    n choices of one response (`{id}-{index}` each; the response's id is `{id}`)."""
    base = f"cmpl-{uuid.uuid4().hex}"
    prompts = body.prompts
    payload = {"sampling": body.sampling(16)}  # OpenAI's legacy default: 16 tokens
    if body.echo:
        payload["echo"] = True
    generations = []
    for index, prompt in enumerate(prompts):
        params = {}
        if isinstance(prompt, list) and settings.privacy_mode == PrivacyMode.FULL:
            params["prompt_ids"] = prompt  # what a traffic calibration replays
        generations.append(
            Generation(
                request_id=base if len(prompts) == 1 else f"{base}-{index}",
                kind=RequestKind.COMPLETION,
                prompt_text=prompt if isinstance(prompt, str) else json.dumps(prompt),
                payload={**payload, "prompt": prompt},
                params=params,
            )
        )
    return generations


async def off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn(*args)` on the completions' thread pool (bounded like the admission
    counters), leaving the server's own pool to every other route."""
    return await anyio.to_thread.run_sync(partial(fn, *args), limiter=request.app.state.completion_threads)


def answer(
    request: Request,
    session: Session,
    settings: Settings,
    fingerprint: ModelFingerprint,
    body: Body,
    generations: list[Generation],
    admission: Admission,
    idempotency_key: str | None = None,
) -> ChatCompletion | Completion | JSONResponse | StreamingResponse:
    """The deployment's checks; then `serve` the request, or the one an earlier call with the
    same Idempotency-Key made."""
    if (error := rejected(session, body, fingerprint, settings)) is not None:
        return error
    if idempotency_key is None:
        return serve(request, session, settings, fingerprint, body, generations, admission)
    route = "chat" if generations[0].kind == RequestKind.CHAT else "completions"
    keys = idempotency.row_keys(admission.principal.token_id, route, idempotency_key, len(generations))
    digest = idempotency.request_digest(body)
    if (earlier := idempotency.earlier_requests(session, keys, digest)) is not None:
        again = [replace(g, request_id=row.id) for g, row in zip(generations, earlier)]
        return serve(request, session, settings, fingerprint, body, again, admission, recorded=True)
    keyed = [
        replace(g, idempotency_key=key, params={**g.params, idempotency.DIGEST: digest})
        for g, key in zip(generations, keys)
    ]
    return serve(request, session, settings, fingerprint, body, keyed, admission)


def _no_stream_channel(request: Request, body: Body) -> JSONResponse | None:
    if not body.stream or request.app.state.streams is not None:
        return None
    message = (
        "stream: streaming needs a Redis broker or result backend (AUDITOR_BROKER_URL=redis://...) or `auditor run`"
    )
    return JSONResponse(error_body(message, "unsupported_parameter", ("body", "stream")), status_code=400)


def serve(
    request: Request,
    session: Session,
    settings: Settings,
    fingerprint: ModelFingerprint,
    body: Body,
    generations: list[Generation],
    admission: Admission,
    recorded: bool = False,
) -> ChatCompletion | Completion | JSONResponse | StreamingResponse:
    """Record the request(s), have a worker generate and score them, answer in OpenAI's shape:
    at once when done, or streamed as generated. `recorded`: the rows exist already (an
    Idempotency-Key retry): queue them again, and the worker answers with what it recorded."""
    if (error := dispatching.no_worker(request, "set AUDITOR_BROKER_URL or use `auditor run`")) is not None:
        return error
    if (error := _no_stream_channel(request, body)) is not None:
        return error
    try:
        for generation in [] if recorded else generations:
            store.create_request(
                session,
                request_id=generation.request_id,
                kind=generation.kind,
                prompt_text=generation.prompt_text,
                privacy_mode=settings.privacy_mode,
                params={"sampling": generation.payload["sampling"], **generation.params},
                model_id=fingerprint.model_id,
                idempotency_key=generation.idempotency_key,
            )
    except IntegrityError:  # the same Idempotency-Key, from a call accepted a moment ago
        session.rollback()
        raise idempotency.racing() from None
    if body.stream:
        return _stream(request, session, settings, fingerprint, body, generations[0], admission)
    results = dispatching.run_requests(
        request,
        session,
        TASK_GENERATE,
        [[generation.request_id, generation.payload] for generation in generations],
        request_ids=[generation.request_id for generation in generations],
        kind=generations[0].kind,
        model_id=fingerprint.model_id,
        timeout=settings.request_timeout,
    )
    if isinstance(results, JSONResponse):
        return results
    return responses.response(generations, results, body, fingerprint.model_id)


def _stream(
    request: Request,
    session: Session,
    settings: Settings,
    fingerprint: ModelFingerprint,
    body: Body,
    generation: Generation,
    admission: Admission,
) -> StreamingResponse | JSONResponse:
    """Queue the request's task with its channel open, and answer with the stream."""
    reader = request.app.state.streams
    reader.open(generation.request_id)
    refused = dispatching.submit_requests(
        request,
        session,
        TASK_GENERATE,
        [generation.request_id, {**generation.payload, "stream": True}],
        request_ids=[generation.request_id],
        kind=generation.kind,
        model_id=fingerprint.model_id,
    )
    if refused is not None:
        reader.close(generation.request_id)
        return refused
    session.close()  # the stream may last minutes: hold no database connection meanwhile
    streamed = StreamedRequest(
        request_id=generation.request_id,
        kind=generation.kind,
        model_id=fingerprint.model_id,
        body=body,
    )
    return stream_response(streamed, reader, admission.keep(), settings.request_timeout)
