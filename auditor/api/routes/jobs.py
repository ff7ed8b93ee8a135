"""Admin work that needs the model and so runs on a worker: extracting a concept from
contrastive pairs, and calibrating the active concepts. Each returns 202 with a job to poll."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse

from auditor import audit_log, store
from auditor.api.deps import SessionDep, SettingsDep
from auditor.api.errors import error_body, unavailable
from auditor.api.limits import check_extraction
from auditor.api.security import PrincipalDep
from auditor.dispatch import TASK_CALIBRATE, TASK_EXTRACT, WorkerUnavailable
from auditor.models import Concept
from auditor.schemas import CalibrationCreate, CalibrationRead, ExtractionCreate, JobAccepted, JobRead
from probes.concepts import concept_from_dict

router = APIRouter(prefix="/admin", tags=["admin: jobs"])


def _enqueue(request: Request, session, principal, *, kind: str, task: str, payload: dict) -> JSONResponse:
    dispatcher = request.app.state.dispatcher
    if dispatcher is None:
        return JSONResponse(error_body("no worker is configured", "worker_unavailable", ("server",)), status_code=503)
    job = store.create_job(session, kind=kind, payload=payload)
    audit_log.record(session, actor=principal, action=f"job.{kind}", target=f"job:{job.id}",
                     details={key: value for key, value in payload.items() if key != "concept"})
    session.commit()  # the row first: a worker never sees a job id the database lacks
    try:
        dispatcher.submit(task, [job.id], task_id=f"job-{job.id}")
    except WorkerUnavailable as exc:
        store.finish_job(session, job_id=job.id, error=f"not queued: {exc}")
        session.commit()
        return unavailable(exc)
    poll = f"/admin/jobs/{job.id}"
    body = JobAccepted(job_id=job.id, kind=kind, status="queued", poll=poll)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_202_ACCEPTED, headers={"Location": poll})


@router.post("/concepts/extract", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted)
def extract(body: ExtractionCreate, request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep):
    """Queue extraction of a concept vector from contrastive pairs. When the job is done, its
    result names the registered concept version, its primary layer and held-out separation."""
    check_extraction(body, settings)
    concept = {"name": body.name, "description": body.description,
               "pairs": [pair.model_dump() for pair in body.pairs]}
    concept_from_dict(concept, origin="pairs")  # every check the worker would make, before queueing
    payload = {"concept": concept, "method": body.method or settings.extraction_method,
               "pooling": body.pooling or settings.pooling, "activate": body.activate, "created_by": principal.name}
    return _enqueue(request, session, principal, kind="extract", task=TASK_EXTRACT, payload=payload)


@router.post("/calibrations", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted)
def calibrate(request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep,
              body: CalibrationCreate | None = None):
    """Queue recalibration of every active concept; thresholds sit at `target_fpr`."""
    target_fpr = (body.target_fpr if body else None) or settings.target_fpr
    return _enqueue(request, session, principal, kind="calibrate", task=TASK_CALIBRATE, payload={"target_fpr": target_fpr})


@router.get("/calibrations", response_model=list[CalibrationRead])
def calibrations(
    session: SessionDep,
    all_layers: bool = False,
    reference_set: Annotated[str, Query(pattern="^(neutral|control:residual|control:hidden|control:surface)$")] = "neutral",
) -> list[CalibrationRead]:
    """The calibration in force for each active concept: its threshold, the false-positive rate
    it targets and the rate it achieved on its reference set. `neutral`: scores of standalone
    neutral text (raw-score thresholds; z-scores are relative to it). `control:residual`: the
    concept-score alert threshold (z) on answers to control prompts; `control:hidden` /
    `control:surface`: the divergence gap thresholds. Primary layers only unless `all_layers`."""
    concepts = {c.id: c for c in store.list_concepts(session, active=True)}
    rows = store.latest_calibrations(session, concept_ids=list(concepts), reference_set=reference_set)
    out = []
    for (concept_id, layer), row in sorted(rows.items(), key=lambda kv: (concepts[kv[0][0]].name, kv[0])):
        concept: Concept = concepts[concept_id]
        primary = layer == concept.primary_layer
        if primary or all_layers:
            out.append(CalibrationRead(
                concept=concept.name, concept_id=concept_id, version=concept.version, layer=layer, primary=primary,
                mean=row.mean, std=row.std, n_reference=row.n_reference, threshold=row.threshold,
                target_fpr=row.target_fpr, achieved_fpr=row.achieved_fpr, reference_set=row.reference_set,
                created_at=row.created_at))
    return out


@router.get("/jobs/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep) -> JobRead:
    job = store.get_job(session, job_id=job_id)
    if job is None:
        raise store.NotFoundError(f"no job {job_id!r}")
    return JobRead.model_validate(job)
