"""Concept bodies: registering a vector (JSON), reading a concept version, and extracting one
from contrastive pairs (a job)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from auditor.schemas import FINITE, MAX_D_MODEL, MAX_PAIRS, MAX_VECTOR_LAYERS, NAME_PATTERN, Text


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
