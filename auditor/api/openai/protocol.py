"""The OpenAI wire format Auditor speaks (pydantic): the chat completion and completion request
bodies, and the responses they get, with Auditor's one extension, the `auditor` block.

The OpenAI SDK's own models allow fields they do not know, so an OpenAI client reads the block as
`response.model_extra["auditor"]`. Here it is typed as far as its shape is stable: scores, flags
and alerts always carry the keys below; `monitor` carries a few always and the rest only when the
answer was read against a fitted null. A newer worker's extra keys pass through unchanged.

The chat message a request carries is auditor.schemas.ChatMessage (/v1/audits items carry it
too); the error body every route answers with is auditor.api.schemas.ErrorBody.

Size: the whole wire format in one place, requests beside the responses they get, as OpenAI's
own reference reads; splitting it would scatter one document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
)

from auditor.schemas import FINITE, INT64_MAX, INT64_MIN, MAX_MESSAGES, MAX_TEXT_CHARS, MAX_TOKENS, ChatMessage, Text

# ---- requests ----


class AuditorOptions(BaseModel):
    """Auditor's extension to the OpenAI request body (`extra_body={"auditor": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    concepts: list[Text] | None = Field(
        None, max_length=256, description="return inline scores for these active concepts only (all are still stored)"
    )


MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256


# OpenAI parameters that change nothing a self-hosted model does: accepted and not used (as `user`).
IDENTIFIERS = ("metadata", "store", "prompt_cache_key", "safety_identifier", "service_tier")
# OpenAI parameters for features this server does not have: a 400 naming them when set.
NOT_OFFERED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served model does not reason in a separate budget",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "repetition_penalty": "penalties are not supported",
    "min_p": "min_p is not supported",
}


class _SamplingFields(BaseModel):
    """What both routes take. Every parameter OpenAI defines is declared, so none is silently
    ignored: each is honoured, accepted as an identifier that changes nothing (IDENTIFIERS), or
    `unsupported()` names it and the route answers 400; so is any parameter nobody defines."""

    model_config = ConfigDict(**FINITE, extra="allow")

    model: Text = Field(max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension: the k most likely tokens only; -1 or 0: all")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Text | list[Text] | None = Field(
        None, description=f"up to {MAX_STOP_SEQUENCES} sequences; generation ends at the first, which is not returned"
    )
    n: int = Field(1, ge=1, le=128, description="choices per request: only 1 is supported")
    stream: bool = Field(False, description="server-sent events, one chunk per token, each with running scores")
    stream_options: dict[str, Any] | None = Field(None, description="{'include_usage': true}: a last usage chunk")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: Text | None = Field(None, max_length=256, description="accepted; not used")
    auditor: AuditorOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if not stops:
            return None
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return stops

    def sampling(self, default_max_tokens: int) -> dict:
        sampling = {
            "max_new_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        if self.top_k and self.top_k > 0:
            sampling["top_k"] = self.top_k
        if self.stop:
            sampling["stop"] = list(self.stop)
        if (k := self._logprobs()) is not None:
            sampling["logprobs"] = k
        return sampling

    def _logprobs(self) -> int | None:
        """How many alternatives to report per token, or None for no log-probabilities."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, why) for the first parameter set to something this deployment cannot do;
        a parameter at its neutral value (n=1, penalties 0, an empty logit_bias) is accepted."""
        unknown_options = sorted(set(self.stream_options or {}) - {"include_usage"})
        extra = self.model_extra or {}
        neutral = (None, False, "auto", "default", ["text"], {}, [])
        offered = [(name, extra[name] not in neutral, why) for name, why in NOT_OFFERED.items() if name in extra]
        unknown = [name for name in extra if name not in NOT_OFFERED and name not in IDENTIFIERS]
        checks = [
            *offered,
            *(
                (
                    name,
                    True,
                    "unknown parameter: neither OpenAI's nor an extension this server implements (top_k, auditor)",
                )
                for name in unknown
            ),
            ("stream_options", self.stream_options and not self.stream, "stream_options needs stream=true"),
            ("stream_options", unknown_options, f"unsupported stream options {unknown_options}: only include_usage"),
            ("n", self.n != 1, "only one choice per request (n=1) is supported"),
            ("presence_penalty", self.presence_penalty != 0, "penalties are not supported"),
            ("frequency_penalty", self.frequency_penalty != 0, "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            *self._unsupported_here(),
        ]
        return next(((name, why) for name, bad, why in checks if bad), None)

    def _unsupported_here(self) -> list[tuple[str, bool, str]]:
        return []


class ChatCompletionCreate(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _unsupported_here(self) -> list[tuple[str, bool, str]]:
        text_format = self.response_format is None or self.response_format.get("type") == "text"
        return [
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs, "top_logprobs needs logprobs=true"),
            ("response_format", not text_format, "only plain text responses ({'type': 'text'}) are supported"),
            ("tools", bool(self.tools), "tool calls are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool calls are not supported"),
            ("functions", bool(self.functions), "function calls are not supported"),
            ("function_call", self.function_call not in (None, "none"), "function calls are not supported"),
        ]


MAX_PROMPTS = 64  # prompts in one completions request (lm-eval batches send lists)
MAX_PROMPT_TOKEN_IDS = 32_768  # a prompt given as token ids; the model's context is checked by the worker
PromptText = Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)
]
Prompts = PromptText | list[PromptText] | TokenIds | list[TokenIds]
_PROMPT_SHAPES = {
    "text": TypeAdapter(PromptText),
    "texts": TypeAdapter(Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]),
    "token ids": TypeAdapter(TokenIds),
    "token-id lists": TypeAdapter(Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]),
}


def _prompt_shape(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "text" if not isinstance(value, list) else "texts"
    first = value[0]
    return "texts" if isinstance(first, str) else "token-id lists" if isinstance(first, list) else "token ids"


def _one_prompt_shape(value: Any) -> Any:
    """The prompt validated as the one shape its value has, so a 422 says what is wrong with it
    (not why it is none of the four shapes)."""
    shape = _prompt_shape(value)
    try:
        return _PROMPT_SHAPES[shape].validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "too_long" and not first["loc"] and shape in ("texts", "token-id lists"):
            message = f"at most {MAX_PROMPTS} prompts per request"
        raise ValueError(f"prompt{where} ({shape}): {message}") from None


class CompletionCreate(_SamplingFields):
    prompt: Annotated[Any, BeforeValidator(_one_prompt_shape), WithJsonSchema(TypeAdapter(Prompts).json_schema())] = (
        Field(description=f"text, token ids, or a list of up to {MAX_PROMPTS} of either: one choice each, by index")
    )
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS, description="0 with echo: read the prompt only")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="return the prompt before the answer (and its tokens' logprobs)")
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: Text | None = Field(None, max_length=MAX_TEXT_CHARS)

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def _logprobs(self) -> int | None:
        return self.logprobs

    def sampling(self, default_max_tokens: int) -> dict:
        sampling = super().sampling(default_max_tokens)
        if self.echo and self.logprobs is not None:
            sampling["prompt_logprobs"] = self.logprobs
        return sampling

    def _unsupported_here(self) -> list[tuple[str, bool, str]]:
        return [
            ("echo", self.echo and self.stream, "echo is not supported with stream=true"),
            ("prompt", self.stream and len(self.prompts) > 1, "stream=true takes one prompt, not a list"),
            ("max_tokens", self.max_tokens == 0 and self.stream, "max_tokens 0 reads the prompt only: not streamed"),
            ("best_of", self.best_of not in (None, 1), "best_of is not supported"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported"),
        ]


# ---- the `auditor` block of a response ----

# Built from the worker's result (a dict, over Celery's JSON); keys it adds pass through.
_OPEN = ConfigDict(extra="allow")


class AnswerScore(BaseModel):
    """One concept's scores at its primary layer (workers.serving.service.headline)."""

    model_config = _OPEN

    layer: int
    mean: float | None
    max: float | None
    last: float | None
    z: float | None = Field(description="against ordinary answers of the same length (an ordinary answer reads near 0)")
    percentile: float | None = Field(description="against ordinary answers of the same length")
    neutral_z: float | None = Field(description="against standalone neutral text")
    neutral_percentile: float | None


class AnswerFlag(BaseModel):
    """A divergence flag (kind hidden / surface) or a concept-score alert (kind threshold)."""

    model_config = _OPEN

    concept: str
    kind: str = Field(description="hidden / surface (divergence flags) or threshold (concept-score alert)")
    residual_z: float
    text_z: float | None
    threshold: float
    reason: str


class MonitorReading(BaseModel):
    """How the answer was read. Only the keys the worker gave are sent: the reference and
    thresholds appear only when a fitted null of ordinary answers applied."""

    model_config = _OPEN

    status: str = Field(description="ok, insufficient_tokens (too short to flag), calibrating or off")
    tokens: int | None = None
    reference: str | None = None
    target_fpr: float | None = None
    min_tokens: int | None = None
    read_at_length: int | None = None
    divergence_threshold: float | None = None
    alert_threshold: float | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler):
        # Absent stays absent (not null): the block is the worker's, key for key.
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class AuditorReading(BaseModel):
    """The one extension to OpenAI's shape: the request id (its full scores are rows in the
    database), per-concept scores at each concept's primary layer, divergence `flags` and
    concept-score `alerts` (both within the deployment's per-request false-alarm budget), and
    `monitor`: how the answer was read."""

    request_id: str
    scores: dict[str, AnswerScore]
    flags: list[AnswerFlag]
    alerts: list[AnswerFlag]
    monitor: MonitorReading


# ---- responses ----


class _Response(BaseModel):
    # As OpenAI's own models: a field a client does not know is kept, not refused. A field with
    # a default (`object`, `logprobs`) is still always sent: the schema says it is required.
    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None  # OpenAI's schema requires it (nullable); Auditor never refuses


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(_Response):
    """The legacy completions shape: parallel lists, offsets into the returned text."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first token of an echoed prompt
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]

    @classmethod
    def from_entries(cls, entries: list[dict], k: int, start: int = 0) -> CompletionLogprobs:
        """The worker's per-token entries (chat shape) as the legacy lists; `start` is where the
        first token's text begins in the returned text (a streamed chunk's offset)."""
        offsets, at = [], start
        for entry in entries:
            offsets.append(at)
            at += len(entry["token"])
        return cls(
            tokens=[e["token"] for e in entries],
            token_logprobs=[e["logprob"] for e in entries],
            top_logprobs=[_top(e["top_logprobs"]) for e in entries] if k else None,
            text_offset=offsets,
        )


def _top(alternatives: list[dict] | None) -> dict[str, float] | None:
    return None if alternatives is None else {t["token"]: t["logprob"] for t in alternatives}


class ChatCompletionChoice(_Response):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatChoiceLogprobs | None = None


class CompletionChoice(_Response):
    index: int
    text: str | None
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None
    # With a list of prompts, each choice's own reading (its request id, scores, flags).
    auditor: AuditorReading | None = Field(None, exclude_if=lambda value: value is None)


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    auditor: AuditorReading


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    auditor: AuditorReading


# ---- streamed responses: one chunk per step, as OpenAI streams them ----


class LiveScore(BaseModel):
    """A concept's running score at its primary layer over the tokens streamed so far."""

    model_config = _OPEN

    layer: int
    mean: float | None
    last: float | None


class LiveReading(BaseModel):
    """The `auditor` block of a chunk before the last: the request id, how many tokens the text
    so far covers, and their running scores. The last chunk carries the full AuditorReading."""

    request_id: str
    tokens: int
    scores: dict[str, LiveScore]


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler):
        # OpenAI sends the role once, in the first chunk, and content only when there is some.
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    auditor: AuditorReading | LiveReading | None = None


class CompletionChunkChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    auditor: AuditorReading | LiveReading | None = None


# ---- the model list ----


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]
