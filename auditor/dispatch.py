"""How the API hands work to a worker without importing (or running) the model.

`CeleryDispatcher` sends tasks by name over the broker; the composition root (`auditor run`)
injects an in-process dispatcher instead for the embedded default.
"""

from __future__ import annotations

from typing import Any, Protocol

from auditor.errors import AuditorError
from auditor.settings import Settings

TASK_GENERATE = "auditor.generate"
TASK_AUDIT = "auditor.audit"


class WorkerUnavailable(AuditorError):
    """No worker answered in time, or the broker is down."""


class Dispatcher(Protocol):
    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict: ...

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None: ...


def make_celery(settings: Settings):
    """The Celery app both sides share: JSON only, acks late, one task prefetched (DESIGN.md)."""
    from celery import Celery

    app = Celery("auditor", broker=settings.broker_url, backend=settings.result_backend or settings.broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis re-delivers an unacknowledged task after this long: above the longest generation.
        broker_transport_options={"visibility_timeout": settings.task_visibility_timeout},
        result_expires=3600,
        task_track_started=True,
    )
    return app


class CeleryDispatcher:
    def __init__(self, settings: Settings):
        self.app = make_celery(settings)

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        from kombu.exceptions import OperationalError

        try:
            self.app.send_task(task, args=args, task_id=task_id)
        except OperationalError as exc:
            raise WorkerUnavailable(f"broker unavailable: {exc}") from exc

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from kombu.exceptions import OperationalError

        try:
            result = self.app.send_task(task, args=args, task_id=task_id)
        except OperationalError as exc:
            raise WorkerUnavailable(f"broker unavailable: {exc}") from exc
        try:
            return result.get(timeout=timeout, propagate=True)
        except CeleryTimeout as exc:
            raise WorkerUnavailable(f"no worker finished {task} for {task_id} within {timeout:.0f}s") from exc
