"""The OpenAI-compatible routes: parse, check, hand to auditor.api.openai.serving. Each declares
its response model, so the OpenAPI document shows the real response shapes.

`response_class=JSONResponse` keeps the body encoded by json.dumps, as when these routes returned
dicts (Pydantic's own JSON encoder would spell some floats differently: 1e-05 as 0.00001).

The completion handlers are async: what blocks (the database, a non-streamed request's wait for
its worker) runs on the completions' own thread pool (`serving.off_loop`), never on the server's,
so /healthz, /readyz and the admin routes keep their threads however many generations are in
flight. A streamed response waits on its channel in the event loop and holds no thread at all."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from auditor.api.admission import AdmittedDep
from auditor.api.deps import FingerprintDep, SessionDep, SettingsDep
from auditor.api.idempotency import IdempotencyKeyHeader
from auditor.api.openai import serving
from auditor.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionCreate,
    Completion,
    CompletionCreate,
    Model,
    ModelList,
)
from auditor.errors import NotFoundError

router = APIRouter(prefix="/v1", tags=["completions (OpenAI-compatible)"])


@router.post("/chat/completions", response_model=ChatCompletion, response_class=JSONResponse)
async def chat_completions(
    body: ChatCompletionCreate,
    admission: AdmittedDep,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    fingerprint: FingerprintDep,
    idempotency_key: IdempotencyKeyHeader = None,
):
    serving.check_chat(body, settings)
    generations = serving.chat_generation(body, settings)
    return await serving.off_loop(
        request, serving.answer, request, session, settings, fingerprint, body, generations, admission, idempotency_key
    )


@router.post("/completions", response_model=Completion, response_class=JSONResponse)
async def completions(
    body: CompletionCreate,
    admission: AdmittedDep,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    fingerprint: FingerprintDep,
    idempotency_key: IdempotencyKeyHeader = None,
):
    serving.check_completion(body, settings)
    generations = serving.completion_generations(body, settings)
    return await serving.off_loop(
        request, serving.answer, request, session, settings, fingerprint, body, generations, admission, idempotency_key
    )


@router.get("/models", response_model=ModelList)
def list_models(settings: SettingsDep, fingerprint: FingerprintDep) -> ModelList:
    """The served model, by the id every response reports (requests may also name it `auditor`,
    `default` or by the AUDITOR_MODEL setting)."""
    return ModelList(data=[serving.model_card(fingerprint)])


@router.get("/models/{model_id:path}", response_model=Model)
def get_model(model_id: str, settings: SettingsDep, fingerprint: FingerprintDep) -> Model:
    if not serving.serves(model_id, fingerprint, settings):
        raise NotFoundError(f"unknown model {model_id!r}: this deployment serves {fingerprint.model_id!r}")
    return serving.model_card(fingerprint)
