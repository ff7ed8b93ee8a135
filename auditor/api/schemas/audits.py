"""/v1/audits bodies: (prompt or messages, completion) items in, their scores and flags out."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from auditor.schemas import MAX_AUDIT_ITEMS, MAX_MESSAGES, MAX_TEXT_CHARS, ChatMessage, Text


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
