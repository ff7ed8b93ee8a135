"""A streamed completion, as OpenAI streams one: server-sent events, `data: {chunk}` per step,
`data: [DONE]` at the end.

The route handler records the request and queues its task (auditor.api.openai.serving); from
then on the response reads the request's channel (auditor.queue.streams) in the event loop,
holding no server thread, and turns each worker event into a chunk:

- `delta` -> a chunk with the new text (and log-probabilities, when asked for), its `auditor`
  block the running scores of the tokens so far (LiveReading);
- `done` -> whatever of the answer was not sent yet, then the chunk with `finish_reason` and the
  full `auditor` block a non-streamed response has; with `stream_options.include_usage`, then
  a chunk with `usage` and no choices;
- `error` (or no event in time) -> an error chunk, OpenAI's `{"error": {...}}`.

However the response ends (the client disconnecting included), `EventStream` releases the
request's admission and closes the channel; a stream that ended before its answer cancels the
request, which the worker then records `cancelled` with what it had.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from auditor.api.admission import Admission
from auditor.api.errors import error_body
from auditor.api.openai import responses
from auditor.api.openai.protocol import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionCreate,
    CompletionLogprobs,
    LiveReading,
    Usage,
)
from auditor.db.enums import RequestKind
from auditor.queue.streams import StreamReader, StreamTimeout
from auditor.telemetry import metrics

log = logging.getLogger(__name__)

Body = ChatCompletionCreate | CompletionCreate
DONE_LINE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even when the client left before the
    first byte (the body iterator then never starts, so its own `finally` would not run)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        # no-cache / no buffering: proxies (nginx) must pass each event on as it comes.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels us; the cleanup must still run
                await self._on_close()


@dataclass
class StreamedRequest:
    request_id: str
    kind: RequestKind
    model_id: str
    body: Body


class _Chunks:
    """Builds one request's chunks, and remembers what has been sent."""

    def __init__(self, streamed: StreamedRequest):
        self.s = streamed
        self.created = int(time.time())
        self.sent_text = ""
        self.sent_tokens = 0
        self.answered = False  # the worker's `done` or `error` arrived

    @property
    def chat(self) -> bool:
        return self.s.kind == RequestKind.CHAT

    def _select(self, scores: dict) -> dict:
        return responses.select_scores(scores, self.s.body)

    def _chunk(self, choices: list, auditor=None, usage: Usage | None = None) -> BaseModel:
        model = ChatCompletionChunk if self.chat else CompletionChunk
        return model(
            id=self.s.request_id,
            created=self.created,
            model=self.s.model_id,
            choices=choices,
            usage=usage,
            auditor=auditor,
        )

    def _choice(self, text: str | None, entries: list[dict] | None, finish_reason: str | None = None, role=False):
        if self.chat:
            delta = (
                ChatDelta(role="assistant", content="") if role else ChatDelta(content=text) if text else ChatDelta()
            )
            logprobs = None if entries is None else ChatChoiceLogprobs(content=entries)
            return ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        k = self.s.body.logprobs or 0
        logprobs = None if entries is None else CompletionLogprobs.from_entries(entries, k, start=len(self.sent_text))
        return CompletionChunkChoice(index=0, text=text or "", logprobs=logprobs, finish_reason=finish_reason)

    def first(self) -> str | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        return sse(self._chunk([self._choice(None, None, role=True)]))

    def delta(self, event: dict[str, Any]) -> str | None:
        # A task run again (a worker lost mid-stream) streams from the start: send only what is new.
        new = event["text"][max(0, len(self.sent_text) - event["offset"]) :]
        if event["offset"] > len(self.sent_text) or event["tokens"] <= self.sent_tokens:
            return None
        entries = event.get("logprobs")
        if entries is not None:
            entries = entries[max(0, len(entries) - (event["tokens"] - self.sent_tokens)) :]
        choice = self._choice(new, entries)
        live = LiveReading(request_id=self.s.request_id, tokens=event["tokens"], scores=self._select(event["scores"]))
        self.sent_text += new
        self.sent_tokens = event["tokens"]
        return sse(self._chunk([choice], auditor=live))

    def done(self, answer: dict[str, Any]) -> list[str]:
        self.answered = True
        text = answer.get("text") or ""
        if not text.startswith(self.sent_text):  # never expected: the worker sends only settled text
            log.warning("streamed text of %s is not a prefix of its answer", self.s.request_id)
        rest = text[len(self.sent_text) :] if text.startswith(self.sent_text) else ""
        entries = answer.get("logprobs")
        chunks = []
        if rest or (entries is not None and len(entries) > self.sent_tokens):
            # The answer's last tokens: read live as the whole answer is (its final mean and last).
            scores = {
                name: {"layer": s["layer"], "mean": s["mean"], "last": s["last"]}
                for name, s in answer["scores"].items()
            }
            live = LiveReading(
                request_id=self.s.request_id,
                tokens=answer["completion_tokens"] or 0,
                scores=self._select(scores),
            )
            choice = self._choice(rest, None if entries is None else entries[self.sent_tokens :])
            chunks.append(sse(self._chunk([choice], auditor=live)))
            self.sent_text += rest
        reading = responses.reading(self.s.request_id, answer, self.s.body)
        finish = responses.finish_reason(answer)
        chunks.append(sse(self._chunk([self._choice(None, None, finish)], auditor=reading)))
        if self.s.body.include_usage:
            prompt, completion = answer["prompt_tokens"] or 0, answer["completion_tokens"] or 0
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
            chunks.append(sse(self._chunk([], auditor=reading, usage=usage)))
        return chunks

    def error(self, message: str, code: str) -> str:
        self.answered = True
        return sse({"error": error_body(message, code, ("server",))["error"]})


async def events(
    streamed: StreamedRequest, reader: StreamReader, chunks: _Chunks, timeout: float
) -> AsyncIterator[str]:
    if (first := chunks.first()) is not None:
        yield first
    try:
        async for event in reader.events(streamed.request_id, timeout=timeout):
            if event["type"] == "delta":
                if (chunk := chunks.delta(event)) is not None:
                    yield chunk
            elif event["type"] == "done":
                for chunk in chunks.done(event["answer"]):
                    yield chunk
            elif event["type"] == "error":
                yield chunks.error(event.get("message", "the worker failed this request"), "generation_failed")
    except StreamTimeout as exc:
        metrics.record_request(streamed.kind, "timeout", streamed.model_id)
        yield chunks.error(str(exc), "worker_unavailable")
    except (OSError, ConnectionError) as exc:  # the channel itself (Redis) went away
        yield chunks.error(f"lost the stream channel: {type(exc).__name__}: {exc}", "stream_unavailable")
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            yield chunks.error(f"lost the stream channel: {type(exc).__name__}: {exc}", "stream_unavailable")
        else:
            raise
    yield DONE_LINE


def stream_response(
    streamed: StreamedRequest, reader: StreamReader, admission: Admission, timeout: float
) -> EventStream:
    """The response of a request whose task is queued and whose channel is open."""
    chunks = _Chunks(streamed)

    async def on_close() -> None:
        try:
            if not chunks.answered:  # the client left (or the wait ended) before the answer
                await reader.cancel(streamed.request_id)
        except Exception:  # best effort: the worker records what it had whatever happens here
            log.warning("could not cancel %s", streamed.request_id, exc_info=True)
        finally:
            reader.close(streamed.request_id)
            admission.release()

    return EventStream(events(streamed, reader, chunks, timeout), on_close)
