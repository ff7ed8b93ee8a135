"""Bearer tokens (create, read, the secret issued once) and the admin audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from auditor.schemas import Text


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
