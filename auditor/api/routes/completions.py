"""OpenAI-compatible, monitored: /v1/chat/completions and /v1/completions. The response is the
OpenAI shape plus an `auditor` field: the request id and per-concept scores at each concept's
primary layer. Every request's full scores are rows in the database."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from auditor.api.deps import FingerprintDep, SessionDep, SettingsDep
from auditor.api.errors import error_body, unavailable
from auditor.api.limits import check_chat, check_completion
from auditor.db import store
from auditor.errors import BrokerUnavailable, WorkerUnavailable
from auditor.model_identity import ModelFingerprint
from auditor.queue.dispatch import TASK_GENERATE
from auditor.schemas import ChatCompletionCreate, CompletionCreate
from auditor.settings import Settings
from auditor.telemetry import metrics

router = APIRouter(prefix="/v1", tags=["completions (OpenAI-compatible)"])

MODEL_ALIASES = ("auditor", "default")


def _unknown_model(name: str, fingerprint: ModelFingerprint, settings: Settings) -> JSONResponse | None:
    if name in (fingerprint.model_id, settings.model, *MODEL_ALIASES):
        return None
    message = f"unknown model {name!r}: this deployment serves {fingerprint.model_id!r}"
    return JSONResponse(error_body(message, "model_not_found", ("body", "model")), status_code=404)


def _unknown_concepts(session, body) -> JSONResponse | None:
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


def _select_scores(scores: dict, body) -> dict:
    """Inline scores for the concepts the request named (a name matches all its active versions)."""
    wanted = body.auditor.concepts if body.auditor else None
    if not wanted:
        return scores
    return {key: value for key, value in scores.items() if key.split(":v")[0] in wanted}


def _rejected(session, body, fingerprint: ModelFingerprint, settings: Settings) -> JSONResponse | None:
    """Checks both completion routes make before anything is written or queued."""
    if (error := _unknown_model(body.model, fingerprint, settings)) is not None:
        return error
    if (error := _unknown_concepts(session, body)) is not None:
        return error
    if body.stream:
        return JSONResponse(
            error_body("stream=true is not supported yet", "unsupported", ("body", "stream")), status_code=400
        )
    return None


def _dispatch(
    request: Request,
    session,
    *,
    request_id: str,
    kind: str,
    prompt_text: str,
    payload: dict,
    settings: Settings,
    fingerprint: ModelFingerprint,
) -> dict | JSONResponse:
    params = {"sampling": payload["sampling"]}
    if "messages" in payload and settings.privacy_mode == "full":
        # Kept only where the text is kept anyway: a traffic calibration replays the messages
        # through the chat template (the joined prompt_text cannot be re-templated).
        params["messages"] = payload["messages"]
    dispatcher = request.app.state.dispatcher
    if dispatcher is None:
        return JSONResponse(
            error_body(
                "no worker is configured (set AUDITOR_BROKER_URL or use `auditor run`)",
                "worker_unavailable",
                ("server",),
            ),
            status_code=503,
        )
    # Commit the row, then enqueue: a worker never sees an id the database does not have.
    store.create_request(
        session,
        request_id=request_id,
        kind=kind,
        prompt_text=prompt_text,
        privacy_mode=settings.privacy_mode,
        params=params,
        model_id=fingerprint.model_id,
    )
    session.commit()
    try:
        return dispatcher.run(
            TASK_GENERATE, [request_id, payload], task_id=request_id, timeout=settings.request_timeout
        )
    except WorkerUnavailable as exc:
        metrics.record_request(kind, "unavailable", fingerprint.model_id)
        if isinstance(exc, BrokerUnavailable):  # never queued: say so on the row, nothing will run it
            store.mark_request(session, request_id=request_id, status="failed", error=f"not queued: {exc}"[:2000])
            session.commit()
        return unavailable(exc)


def _auditor_field(request_id: str, result: dict, body) -> dict:
    """The one extension to OpenAI's shape. `scores[concept].z` / `.percentile` are read against
    ordinary answers of the same length (an ordinary answer reads near 0), `neutral_z` against
    standalone neutral text; `flags` are divergence flags, `alerts` concept-score crossings, both
    within the deployment's per-request false-alarm budget; `monitor.status` says how the answer
    was read (`insufficient_tokens` for answers too short to flag)."""
    return {
        "request_id": request_id,
        "scores": _select_scores(result["scores"], body),
        "flags": result.get("flags", []),
        "alerts": result.get("alerts", []),
        "monitor": result.get("monitor", {"status": "off"}),
    }


def _usage(result: dict) -> dict:
    prompt, completion = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/chat/completions")
def chat_completions(
    body: ChatCompletionCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    fingerprint: FingerprintDep,
):
    check_chat(body, settings)
    if (error := _rejected(session, body, fingerprint, settings)) is not None:
        return error
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    messages = [m.model_dump() for m in body.messages]
    sampling = body.sampling(settings.max_new_tokens)
    if body.max_completion_tokens:
        sampling["max_new_tokens"] = body.max_completion_tokens
    result = _dispatch(
        request,
        session,
        request_id=request_id,
        kind="chat",
        prompt_text="\n".join(f"{m['role']}: {m['content']}" for m in messages),
        payload={"messages": messages, "sampling": sampling},
        settings=settings,
        fingerprint=fingerprint,
    )
    if isinstance(result, JSONResponse):
        return result
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": fingerprint.model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        "auditor": _auditor_field(request_id, result, body),
    }


@router.post("/completions")
def completions(
    body: CompletionCreate, request: Request, session: SessionDep, settings: SettingsDep, fingerprint: FingerprintDep
):
    check_completion(body, settings)
    if (error := _rejected(session, body, fingerprint, settings)) is not None:
        return error
    request_id = f"cmpl-{uuid.uuid4().hex}"
    # OpenAI's legacy default is 16 tokens.
    sampling = body.sampling(16)
    result = _dispatch(
        request,
        session,
        request_id=request_id,
        kind="completion",
        prompt_text=body.prompt,
        payload={"prompt": body.prompt, "sampling": sampling},
        settings=settings,
        fingerprint=fingerprint,
    )
    if isinstance(result, JSONResponse):
        return result
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": fingerprint.model_id,
        "choices": [{"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}],
        "usage": _usage(result),
        "auditor": _auditor_field(request_id, result, body),
    }
