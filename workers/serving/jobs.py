"""The admin jobs' bodies: extraction of a concept from contrastive pairs, and recalibration of
the active concepts. Each runs on the model thread, once per queued job however often its task
runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from auditor.access import audit_log
from auditor.db import store
from auditor.db.enums import CalibrationSource, ConceptSource, JobStatus
from auditor.db.labels import version_label
from auditor.errors import InvalidInputError
from probes.answer_null import null_to_dict
from probes.calibration import fpr_thresholds
from probes.concepts import concept_from_dict
from workers.monitoring.control import bank_key
from workers.serving.context import WorkerContext, get_runtime
from workers.serving.registry import bank_from_registry, find_extracted, register_extracted


def _run_job(job_id: str, runtime: WorkerContext, work) -> dict[str, Any]:
    """Run `work(session)` for a queued job once: a finished job returns its stored result
    (re-delivery after a crash is harmless); a failure is recorded on the job, then raised."""
    with runtime.sessions() as session:
        job = store.get_job(session, job_id=job_id)
        if job is None:
            raise InvalidInputError(f"no job {job_id!r}")
        if job.status in (JobStatus.DONE, JobStatus.FAILED):
            return {"job_id": job_id, "status": job.status, "result": job.result, "error": job.error}
        store.start_job(session, job_id=job_id)
        session.commit()
        payload = dict(job.payload)

    def run() -> dict[str, Any]:
        with runtime.sessions() as session:
            result = work(session, payload)
            store.finish_job(session, job_id=job_id, result=result)
            session.commit()
            return result

    try:
        # On the model thread, between decode steps: extraction and calibration use the model.
        result = runtime.model_thread.call(run).result()
    except Exception as exc:
        with runtime.sessions() as session:
            store.finish_job(session, job_id=job_id, error=f"{type(exc).__name__}: {exc}"[:2000])
            session.commit()
        raise
    return {"job_id": job_id, "status": JobStatus.DONE, "result": result, "error": None}


def serve_extraction(job_id: str, runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Extract a concept from the job's contrastive pairs at every layer, sweep for the primary
    layer, and register it as the concept's next version. The same pairs, method and pooling
    already registered on this model are reused, not registered twice."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        definition = concept_from_dict(payload["concept"], origin="job")
        method, pooling = payload["method"], payload["pooling"]
        concept = find_extracted(session, runtime.host, definition, method, pooling)
        reused = concept is not None
        if concept is None:
            vectors = runtime.host.vectors(definition, method, pooling)
            registration = register_extracted(
                session,
                runtime.host,
                definition,
                vectors,
                created_by=payload.get("created_by", "api"),
                activate=payload.get("activate", True),
            )
            # An identical job registered it while this one extracted: reused, not logged twice.
            concept, reused = registration.concept, not registration.created
        if not reused:
            audit_log.record(
                session,
                actor=payload.get("created_by"),
                action="concept.register",
                target=f"concept:{version_label(concept.name, concept.version)}",
                vector_hash=concept.vector_hash,
                details={"concept_id": concept.id, "source": ConceptSource.PAIRS, "job_id": job_id},
            )
        sweep = {row["layer"]: row for row in concept.provenance.get("sweep", [])}
        return {
            "concept_id": concept.id,
            "name": concept.name,
            "version": concept.version,
            "primary_layer": concept.primary_layer,
            "n_pairs": concept.n_pairs,
            "reused": reused,
            "held_out_auroc": sweep.get(concept.primary_layer, {}).get("auroc"),
        }

    return _run_job(job_id, runtime, work)


def serve_calibration(job_id: str, runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Recalibrate every active concept: the neutral-text calibration (standalone text, every
    layer) and the null of ordinary answers, from the control prompts or (`source: traffic`) from
    the deployment's own answers recorded in [since, until). Workers pick the new calibration up
    on their next request."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        bank = bank_from_registry(session, runtime.host)
        target_fpr = float(payload.get("target_fpr") or runtime.settings.target_fpr)
        rows = runtime.calibrate(session, bank, target_fpr)
        window = None
        if payload.get("source") == CalibrationSource.TRAFFIC:
            window = (datetime.fromisoformat(payload["since"]), datetime.fromisoformat(payload["until"]))
            null = runtime.fit_traffic_null(session, bank, target_fpr, *window)
        else:
            null = runtime.fit_control_null(bank, target_fpr)
        model = runtime.host.model
        summary = null.summary()
        row = store.add_answer_calibration(
            session,
            bank_key=bank_key(model, bank),
            model_fingerprint=model.fingerprint.hash,
            concept_ids=bank.concept_ids or [],
            source=payload.get("source", CalibrationSource.CONTROL),
            null=null_to_dict(null),
            summary=summary,
            window_start=window[0] if window else None,
            window_end=window[1] if window else None,
        )
        thresholds, achieved = fpr_thresholds(bank.calibration, target_fpr)
        concepts = {}
        for k, name in enumerate(bank.names):
            layer = bank.auto_layers[name]
            if layer in bank.layers:
                li = bank.layers.index(layer)
                concepts[name] = {
                    "concept_id": bank.concept_ids[k],
                    "layer": layer,
                    "neutral_threshold": float(thresholds[li, k]),
                    "neutral_achieved_fpr": float(achieved[li, k]),
                }
        return {
            "rows": rows,
            "target_fpr": target_fpr,
            "n_reference": bank.calibration.n_reference,
            "answer_calibration_id": row.id,
            "source": row.source,
            **summary,
            "concepts": concepts,
        }

    return _run_job(job_id, runtime, work)
