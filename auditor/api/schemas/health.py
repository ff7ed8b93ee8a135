"""The served model and the health probes' bodies."""

from __future__ import annotations

from pydantic import BaseModel


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
