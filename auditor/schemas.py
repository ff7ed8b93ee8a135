"""Request and response bodies (pydantic). Families: ConceptCreate / ConceptRead / …"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"

# Hard ceilings on request shapes, published in the OpenAPI document. Settings (auditor/settings.py,
# "input limits") can tighten the last three per deployment; the routes check those.
MAX_D_MODEL = 65536  # values per vector; a vector must still match the served model's d_model
MAX_VECTOR_LAYERS = 512  # layers per vector set; each must still exist in the served model
MAX_TEXT_CHARS = 100_000  # one prompt, chat message or completion
MAX_MESSAGES = 256
MAX_TOKENS = 4096
MAX_PAIRS = 2000
MAX_AUDIT_ITEMS = 64
# JSON numbers are decoded by Python's json, which takes NaN, Infinity and 1e999 (= inf); a request
# body with a float field refuses them (422 "Input should be a finite number"), so none is stored.
FINITE = ConfigDict(allow_inf_nan=False)
# OpenAI's seed is an int64; torch's generator would overflow past it (a 500 from the worker).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Text no database can store: NUL (Postgres text and jsonb refuse it) and unpaired surrogates
# (JSON's "\udXXX" escapes decode to them; they are not Unicode and have no UTF-8 encoding).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(value: Any, where: str = "text", *, finite: bool = False) -> str | None:
    """Why `value` (a string, or JSON-like data: dicts, lists, numbers) cannot be stored, or None.
    With `finite`, NaN and infinities count too (Postgres jsonb refuses them)."""
    if isinstance(value, str):
        if (match := _UNSTORABLE.search(value)) is None:
            return None
        char = match.group()
        what = "a NUL character (U+0000)" if char == "\x00" else f"an unpaired surrogate (U+{ord(char):04X})"
        return f"{where} contains {what}, which cannot be stored"
    if isinstance(value, float):
        return f"{where} is {value}, not a finite number" if finite and not math.isfinite(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        inner = f"{where}[{key!r}]"
        if problem := (unstorable(key, f"a key of {where}") or unstorable(item, inner, finite=finite)):
            return problem
    return None


def _storable(text: str) -> str:
    if problem := unstorable(text, "the text"):
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_storable)]  # every free text a request body carries


class ConceptCreate(BaseModel):
    """Register a vector sent as JSON: one layer (`layer` + `vector`) or several (`vectors`)."""

    model_config = ConfigDict(extra="forbid", **FINITE)

    name: str = Field(
        pattern=NAME_PATTERN, description="concept name; a new vector under an existing name is its next version"
    )
    description: Text = Field("", max_length=2000)
    layer: int | None = Field(None, ge=0, description="layer of `vector`")
    vector: list[float] | None = Field(None, max_length=MAX_D_MODEL)
    vectors: dict[int, list[float]] | None = Field(None, max_length=MAX_VECTOR_LAYERS, description="layer -> vector")
    primary_layer: int | None = Field(
        None, ge=0, description="the layer reports lead with; default: the middle given layer"
    )
    model_fingerprint: Text | None = Field(None, description="if given, must match the served model's")

    @field_validator("vectors")
    @classmethod
    def _bounded(cls, value: dict[int, list[float]] | None) -> dict[int, list[float]] | None:
        if value is not None and any(len(v) > MAX_D_MODEL for v in value.values()):
            raise ValueError(f"a vector may have at most {MAX_D_MODEL} values")
        return value


class ConceptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    version: int
    description: str
    active: bool
    retired_at: datetime | None
    created_by: str
    created_at: datetime
    model_id: str
    model_revision: str | None
    model_fingerprint: str
    loader: str
    hook_point: str
    d_model: int
    method: str
    pooling: str
    n_pairs: int | None
    pairs_hash: str | None
    vector_hash: str
    source: str
    primary_layer: int
    layers: list[int]
    provenance: dict[str, Any]


class ModelRead(BaseModel):
    model_id: str
    revision: str
    loader: str
    hook_point: str
    n_layers: int
    d_model: int
    fingerprint: str


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


# ---- OpenAI-compatible completions ----


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_TEXT_CHARS)


class AuditorOptions(BaseModel):
    """Auditor's extension to the OpenAI request body (`extra_body={"auditor": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    concepts: list[Text] | None = Field(
        None, max_length=256, description="return inline scores for these active concepts only (all are still stored)"
    )


class _SamplingFields(BaseModel):
    model_config = FINITE

    model: Text = Field(max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    user: Text | None = Field(None, max_length=256)
    auditor: AuditorOptions | None = None

    def sampling(self, default_max_tokens: int) -> dict:
        return {
            "max_new_tokens": self.max_tokens or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


class ChatCompletionCreate(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)


class CompletionCreate(_SamplingFields):
    prompt: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)


# ---- audits of completions served elsewhere ----


class AuditItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    completion: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class AuditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[AuditItem] = Field(min_length=1, max_length=MAX_AUDIT_ITEMS)


class AuditScore(BaseModel):
    concept: str
    concept_id: int
    version: int
    layer: int
    mean: float
    max: float
    last: float
    z: float | None = Field(description="against ordinary answers of the same length (primary layer only)")
    percentile: float | None = Field(description="against ordinary answers of the same length (primary layer only)")
    neutral_z: float | None = Field(description="against standalone neutral text (every layer)")
    neutral_percentile: float | None


class AuditFlag(BaseModel):
    concept: str
    kind: str = Field(description="hidden / surface (divergence flags) or threshold (concept-score alert)")
    residual_z: float
    text_z: float | None
    threshold: float
    reason: str


class AuditRead(BaseModel):
    id: str
    status: str
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    monitor_status: str | None = Field(description="ok, insufficient_tokens, calibrating or off")
    scores: list[AuditScore]
    flags: list[AuditFlag]
    alerts: list[AuditFlag]


# ---- admin jobs: extraction from pairs, calibration ----


class ContrastivePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: Text = Field(min_length=1, max_length=10_000, description="text that expresses the concept")
    negative: Text = Field(min_length=1, max_length=10_000, description="matched text that does not")


class ExtractionCreate(BaseModel):
    """Extract a concept vector from contrastive pairs on the served model (runs as a job)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="concept name; registers its next version")
    description: Text = Field("", max_length=2000)
    pairs: list[ContrastivePair] = Field(min_length=2, max_length=MAX_PAIRS)
    method: Literal["mean_diff", "logistic", "pca", "lda"] | None = Field(None, description="default: the deployment's")
    pooling: Literal["mean", "last"] | None = Field(None, description="default: the deployment's")
    activate: bool = Field(True, description="monitor it from the next request once registered")


class CalibrationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", **FINITE)

    target_fpr: float | None = Field(None, gt=0, lt=1, description="default: the deployment's (0.01)")
    source: Literal["control", "traffic"] = Field(
        "control",
        description="control: the shipped control prompts' answers; traffic: this deployment's "
        "own recorded answers in [since, until) (full privacy mode, unsteered)",
    )
    since: AwareDatetime | None = Field(None, description="start of the baseline window (source=traffic)")
    until: AwareDatetime | None = Field(None, description="end of the baseline window; default now")

    @model_validator(mode="after")
    def _window(self) -> CalibrationCreate:
        if self.source == "traffic" and self.since is None:
            raise ValueError("source=traffic needs `since` (the start of the baseline window)")
        if self.source == "control" and (self.since is not None or self.until is not None):
            raise ValueError("`since` / `until` apply to source=traffic only")
        return self  # the order of since / until is checked by the route, in UTC


class AnswerCalibrationRead(BaseModel):
    """A null of ordinary answers: what every generated and audited answer is read against."""

    id: int
    in_force: bool = Field(description="the one the active concepts are read against now")
    source: str
    window_start: datetime | None
    window_end: datetime | None
    concepts: list[str]
    n_answers: int = Field(description="answers at the shortest flagged length")
    target_fpr: float
    confidence: float = Field(description="probability, over the draw of the answers, that the rate holds")
    min_tokens: int = Field(description="shorter answers are marked insufficient_tokens, never flagged")
    certified_length: int = Field(description="longer answers are read at this length")
    divergence_achieved_fpr: float = Field(description="worst length's share of these answers with any flag")
    divergence_upper_95: float = Field(description="Clopper-Pearson 95 % upper bound on it")
    alert_achieved_fpr: float
    alert_upper_95: float
    created_at: datetime


class JobAccepted(BaseModel):
    job_id: str
    kind: str
    status: str
    poll: str = Field(description="GET this URL until status is done or failed")


class JobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    status: str
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class CalibrationRead(BaseModel):
    concept: str
    concept_id: int
    version: int
    layer: int
    primary: bool
    mean: float
    std: float
    n_reference: int
    threshold: float | None
    target_fpr: float | None
    achieved_fpr: float | None
    reference_set: str
    created_at: datetime


# ---- tokens and the admin audit log ----


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=128)
    scopes: list[Literal["admin", "client", "reader"]] = Field(min_length=1, max_length=3)


class TokenRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None


class TokenIssued(TokenRead):
    token: str = Field(description="the secret: shown once, stored only as its sha256")


class AdminActionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    actor_prefix: str | None
    action: str
    target: str | None
    vector_hash: str | None
    details: dict[str, Any]


# ---- errors: one body for every 4xx / 5xx (auditor.api.errors) ----


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(
        description="where: ['body', 'messages', 0, 'content'], ['query', 'since'], ['header', ...]"
    )
    msg: str
    type: str


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """FastAPI's own 422 `detail` list (extra keys such as `input` may appear), plus OpenAI's
    `error` object so OpenAI clients show the message."""

    detail: list[ErrorDetail]
    error: OpenAIError
