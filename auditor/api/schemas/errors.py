"""The one error body every 4xx / 5xx has (built by auditor.api.errors): FastAPI's `detail`
list plus OpenAI's `error` object, so OpenAI clients show the message."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
