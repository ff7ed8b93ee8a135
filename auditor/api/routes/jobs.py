"""Calibrations and the jobs admin work runs as: queue a recalibration of the active concepts
(202 with a job to poll), read the calibrations in force, poll a job. Extracting a concept from
contrastive pairs, the other job, is a concept route (auditor.api.routes.concepts)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from sqlalchemy import func, select

from auditor.api import dispatching
from auditor.api.deps import ReadSessionDep, SessionDep, SettingsDep
from auditor.api.schemas import AnswerCalibrationRead, CalibrationCreate, CalibrationRead, JobAccepted, JobRead
from auditor.api.security import PrincipalDep
from auditor.db import store
from auditor.db.enums import CalibrationSource, JobKind
from auditor.db.models import AnswerCalibration, Concept
from auditor.errors import InvalidInputError, JobNotFound
from auditor.queue.dispatch import TASK_CALIBRATE
from probes.answer_null import minimum_answers

router = APIRouter(prefix="/admin", tags=["admin: jobs"])


@router.post("/calibrations", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted)
def calibrate(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    body: CalibrationCreate | None = None,
):
    """Queue recalibration of every active concept at `target_fpr` (per request, family-wise):
    on the control prompts' answers, or (`source: traffic`) on this deployment's own answers
    recorded in [`since`, `until`). A window with too few replayable answers to promise the
    target is a 422 that queues nothing."""
    body = body or CalibrationCreate()
    target_fpr = body.target_fpr or settings.target_fpr
    payload: dict = {"target_fpr": target_fpr, "source": body.source}
    if body.source == CalibrationSource.TRAFFIC:
        try:
            since = body.since.astimezone(UTC)
            until = (body.until or datetime.now(UTC)).astimezone(UTC)
        except (OverflowError, ValueError):
            raise InvalidInputError("`since` / `until` lie outside the representable UTC range") from None
        if since >= until:
            raise InvalidInputError("`since` must be before `until` (default: now)")
        available = session.scalar(select(func.count()).select_from(store.replayable_requests(since, until).subquery()))
        needed = minimum_answers(target_fpr, settings.calibration_confidence)
        if available < needed:
            raise InvalidInputError(
                f"{available} recorded answers in the window can be replayed (full privacy mode, unsteered); "
                f"promising a {target_fpr:g} false-alarm rate at {settings.calibration_confidence:g} confidence "
                f"needs at least {needed}: widen the window or raise target_fpr"
            )
        payload.update(since=since.isoformat(), until=until.isoformat())
    return dispatching.submit_job(
        request, session, principal, kind=JobKind.CALIBRATE, task=TASK_CALIBRATE, payload=payload
    )


@router.get("/calibrations/answers", response_model=list[AnswerCalibrationRead])
def answer_calibrations(
    session: ReadSessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> list[AnswerCalibrationRead]:
    """The nulls of ordinary answers, newest first: what generated and audited answers are read
    against (z, percentile, flags, alerts), with the false-alarm rate each achieved on its own
    answers and its Clopper-Pearson 95 % upper bound beside the target. `in_force` marks the
    one for the currently active concept versions."""
    active = sorted(c.id for c in store.list_concepts(session, active=True))
    names = {c.id: c.name for c in store.list_concepts(session)}
    rows = session.scalars(select(AnswerCalibration).order_by(AnswerCalibration.id.desc()).limit(limit))
    out, seen_in_force = [], False
    for row in rows:
        in_force = not seen_in_force and sorted(row.concept_ids) == active
        seen_in_force |= in_force
        summary = row.summary or {}
        out.append(
            AnswerCalibrationRead(
                id=row.id,
                in_force=in_force,
                source=row.source,
                window_start=row.window_start,
                window_end=row.window_end,
                concepts=[names.get(i, str(i)) for i in row.concept_ids],
                n_answers=row.n_answers,
                target_fpr=row.target_fpr,
                confidence=row.confidence,
                min_tokens=row.min_tokens,
                certified_length=row.certified_length,
                divergence_achieved_fpr=summary.get("divergence_achieved_fpr", 0.0),
                divergence_upper_95=summary.get("divergence_upper_95", 1.0),
                alert_achieved_fpr=summary.get("alert_achieved_fpr", 0.0),
                alert_upper_95=summary.get("alert_upper_95", 1.0),
                created_at=row.created_at,
            )
        )
    return out


@router.get("/calibrations", response_model=list[CalibrationRead])
def calibrations(
    session: ReadSessionDep,
    all_layers: bool = False,
    reference_set: Annotated[str, Query(pattern="^neutral$")] = "neutral",
) -> list[CalibrationRead]:
    """The neutral-text calibration in force for each active concept: the distribution of
    standalone neutral text (what `neutral_z` and `auditor probe` read against), its raw-score
    threshold at the target rate and the rate achieved. Primary layers only unless `all_layers`.
    Answers are read against ordinary answers instead: see `/admin/calibrations/answers`."""
    concepts = {c.id: c for c in store.list_concepts(session, active=True)}
    rows = store.latest_calibrations(session, concept_ids=list(concepts), reference_set=reference_set)
    out = []
    for (concept_id, layer), row in sorted(rows.items(), key=lambda kv: (concepts[kv[0][0]].name, kv[0])):
        concept: Concept = concepts[concept_id]
        primary = layer == concept.primary_layer
        if primary or all_layers:
            out.append(
                CalibrationRead(
                    concept=concept.name,
                    concept_id=concept_id,
                    version=concept.version,
                    layer=layer,
                    primary=primary,
                    mean=row.mean,
                    std=row.std,
                    n_reference=row.n_reference,
                    threshold=row.threshold,
                    target_fpr=row.target_fpr,
                    achieved_fpr=row.achieved_fpr,
                    reference_set=row.reference_set,
                    created_at=row.created_at,
                )
            )
    return out


@router.get("/jobs/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: ReadSessionDep) -> JobRead:
    job = store.get_job(session, job_id=job_id)
    if job is None:
        raise JobNotFound(job_id)
    return JobRead.model_validate(job)
