"""A worker's results as the OpenAI response: one chat choice, or one text-completion choice per
prompt, with the `auditor` block (auditor.api.openai.protocol.AuditorReading).

With `echo`, a text completion's text starts with its prompt, and its log-probabilities cover
the prompt's tokens (the first has none) before the answer's."""

from __future__ import annotations

import time
from typing import Any

from auditor.api.openai.protocol import (
    AuditorReading,
    ChatChoiceLogprobs,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionCreate,
    ChatCompletionMessage,
    Completion,
    CompletionChoice,
    CompletionCreate,
    CompletionLogprobs,
    Usage,
)
from auditor.db.enums import RequestKind
from auditor.db.labels import concept_name

Body = ChatCompletionCreate | CompletionCreate


def select_scores(scores: dict, body: Body) -> dict:
    """Inline scores for the concepts the request named (a name matches all its active versions)."""
    wanted = body.auditor.concepts if body.auditor else None
    if not wanted:
        return scores
    return {key: value for key, value in scores.items() if concept_name(key) in wanted}


def reading(request_id: str, result: dict, body: Body) -> AuditorReading:
    return AuditorReading.model_validate(
        {
            "request_id": request_id,
            "scores": select_scores(result["scores"], body),
            "flags": result.get("flags", []),
            "alerts": result.get("alerts", []),
            "monitor": result.get("monitor", {"status": "off"}),
        }
    )


def finish_reason(result: dict) -> str:
    """OpenAI's reason: a cancelled answer (its client gone) reads as stopped."""
    return result["finish_reason"] if result["finish_reason"] in ("stop", "length") else "stop"


def response(generations: list, results: list[dict], body: Body, model_id: str) -> ChatCompletion | Completion:
    """The OpenAI response for finished generations (`generations[i]` answered by `results[i]`)."""
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in results)
    completion_tokens = sum(r["completion_tokens"] or 0 for r in results)
    readings = [reading(g.request_id, r, body) for g, r in zip(generations, results)]
    common: dict[str, Any] = {
        "created": int(time.time()),
        "model": model_id,
        "usage": Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        "auditor": readings[0],
    }
    if generations[0].kind == RequestKind.CHAT:
        result = results[0]
        entries = result.get("logprobs")
        choice = ChatCompletionChoice(
            index=0,
            message=ChatCompletionMessage(role="assistant", content=result["text"]),
            finish_reason=finish_reason(result),
            logprobs=None if entries is None else ChatChoiceLogprobs(content=entries),
        )
        return ChatCompletion(id=generations[0].request_id, choices=[choice], **common)
    several = len(generations) > 1
    choices = [
        _completion_choice(index, g, r, body, readings[index] if several else None)
        for index, (g, r) in enumerate(zip(generations, results))
    ]
    # A list of prompts: the response is named by the requests' common stem ({id}-{index} each).
    response_id = generations[0].request_id.rsplit("-", 1)[0] if several else generations[0].request_id
    return Completion(id=response_id, choices=choices, **common)


def _completion_choice(index: int, generation, result: dict, body: CompletionCreate, own: AuditorReading | None):
    text, entries = result["text"] or "", result.get("logprobs")
    if body.echo:
        echoed = result.get("prompt") or {}
        prompt = generation.payload["prompt"]
        # A text prompt is echoed as sent; token ids as the worker decoded them.
        text = (prompt if isinstance(prompt, str) else echoed.get("text", "")) + text
        if entries is not None or body.logprobs is not None:
            entries = (echoed.get("logprobs") or []) + (entries or [])
    logprobs = None if entries is None else CompletionLogprobs.from_entries(entries, body.logprobs or 0)
    return CompletionChoice(index=index, text=text, finish_reason=finish_reason(result), logprobs=logprobs, auditor=own)
