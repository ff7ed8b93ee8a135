"""Celery tasks: thin shells around workers.service (ids and JSON in, plain functions do the work).

Start a worker with `auditor worker` (or `celery -A workers.tasks worker`)."""

from __future__ import annotations

from auditor.dispatch import TASK_AUDIT, TASK_CALIBRATE, TASK_EXTRACT, TASK_GENERATE, make_celery
from auditor.settings import get_settings
from workers import service

celery_app = make_celery(get_settings())
app = celery_app  # `celery -A workers.tasks` looks for `app`


@celery_app.task(name=TASK_GENERATE)
def generate_task(request_id: str, payload: dict) -> dict:
    return service.serve_generation(request_id, payload)


@celery_app.task(name=TASK_AUDIT)
def audit_task(request_ids: list[str], items: list[dict]) -> dict:
    return service.serve_audits(request_ids, items)


@celery_app.task(name=TASK_EXTRACT)
def extract_task(job_id: str) -> dict:
    return service.serve_extraction(job_id)


@celery_app.task(name=TASK_CALIBRATE)
def calibrate_task(job_id: str) -> dict:
    return service.serve_calibration(job_id)
