"""Celery tasks: thin shells around the task bodies in workers.serving (ids and JSON in, plain functions do the work).

Start a worker with `auditor worker` (or `celery -A workers.tasks worker`)."""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown

from auditor import privacy, sealing
from auditor.db import retention
from auditor.errors import TaskRefused
from auditor.queue.deliveries import DeliveryCounter, too_many
from auditor.queue.dispatch import TASK_AUDIT, TASK_CALIBRATE, TASK_EXTRACT, TASK_GENERATE, TASK_RETENTION, make_celery
from auditor.queue.heartbeat import HeartbeatPublisher, is_redis
from auditor.settings import get_settings
from auditor.telemetry import metrics
from workers.serving import context
from workers.serving.audits import serve_audits
from workers.serving.generation import give_up, serve_generation
from workers.serving.jobs import serve_calibration, serve_extraction

celery_app = make_celery(get_settings())
# Outside full mode prompts arrive, and completions leave, sealed (auditor.sealing). Built at
# import: a worker without the deployment's key refuses to start, saying so.
SEALER = sealing.sealer(get_settings())
# Outside full mode no worker log line carries what the mode does not store (auditor.privacy).
privacy.install_log_redaction(get_settings().privacy_mode)
app = celery_app  # `celery -A workers.tasks` looks for `app`


def _deliveries() -> DeliveryCounter | None:
    settings = get_settings()
    url = settings.result_backend or settings.broker_url
    # Kept past the longest a redelivery can take (the visibility timeout), twice over.
    return DeliveryCounter(url, 2 * settings.task_visibility_timeout + 60) if is_redis(url) else None


DELIVERIES = _deliveries()


def _refuse_poison(task_id: str, request_ids: list[str]) -> None:
    """Fail a task that keeps killing its workers, instead of running it again."""
    if DELIVERIES is None:
        return
    try:
        deliveries = DELIVERIES.count(task_id)
    except Exception as exc:  # a guard, not a gate: Redis flickering must not fail the request
        logging.getLogger(__name__).warning("could not count the deliveries of %s: %s", task_id, exc)
        return
    if (reason := too_many(deliveries)) is not None:
        give_up(request_ids, reason)
        raise TaskRefused(reason)


@celery_app.task(name=TASK_GENERATE, bind=True)
def generate_task(self, request_id: str, payload: dict) -> dict:
    _refuse_poison(self.request.id or request_id, [request_id])
    return SEALER.seal(serve_generation(request_id, SEALER.open(payload)))


@celery_app.task(name=TASK_AUDIT, bind=True)
def audit_task(self, request_ids: list[str], items: list[dict]) -> dict:
    _refuse_poison(self.request.id or request_ids[0], request_ids)
    return serve_audits(request_ids, SEALER.open(items))  # its result holds ids and counts only


@celery_app.task(name=TASK_EXTRACT)
def extract_task(job_id: str) -> dict:
    return serve_extraction(job_id)


@celery_app.task(name=TASK_CALIBRATE)
def calibrate_task(job_id: str) -> dict:
    return serve_calibration(job_id)


@celery_app.task(name=TASK_RETENTION)
def retention_task() -> dict:
    """Scheduled by `auditor beat`. Database only: runs on any worker, never loads the model."""
    return retention.run_from_settings(get_settings()).as_dict()


@worker_ready.connect
def warm_up(**_) -> None:
    """Load the model and the calibrated bank as soon as the worker is up, in the background,
    so the first request does not pay for it. Only under `auditor worker`, whose `threads` pool
    never forks: a prefork parent (a hand-rolled `celery worker`) must not load the model."""
    import logging
    import os

    if os.environ.get("AUDITOR_WORKER_POOL") != "threads":
        return

    runtime = context.get_runtime()
    settings = get_settings()
    url = settings.result_backend or settings.broker_url
    if is_redis(url):  # readiness reads this (auditor.queue.heartbeat), with the warm-up progress
        context.heartbeat = HeartbeatPublisher(url, runtime.state.snapshot).start()

    def report(future) -> None:
        # "Up" only once the model serves: a worker whose model failed to load stays down, and
        # the no-live-worker alert fires.
        if future.exception() is not None:
            logging.getLogger(__name__).error("warm-up failed: %s", future.exception())
        else:
            metrics.set_worker_up(runtime.host.model.fingerprint.model_id)

    runtime.model_thread.call(runtime.warm_up).add_done_callback(report)


@worker_shutdown.connect
def mark_down(**_) -> None:
    if context.heartbeat is not None:
        context.heartbeat.stop()
    runtime = context.current_runtime()
    if runtime is not None and runtime.host.loaded:
        metrics.set_worker_up(runtime.host.model.fingerprint.model_id, False)
    metrics.mark_process_dead()
