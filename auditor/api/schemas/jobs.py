"""Calibration bodies (a job to queue, the nulls in force) and the job every queued admin task is."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from auditor.schemas import FINITE


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
