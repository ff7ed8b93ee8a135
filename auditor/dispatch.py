"""How the API hands work to a worker without importing (or running) the model.

`CeleryDispatcher` sends tasks by name over the broker; the composition root (`auditor run`)
injects an in-process dispatcher instead for the embedded default.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from auditor.errors import AuditorError
from auditor.settings import Settings

TASK_GENERATE = "auditor.generate"
TASK_AUDIT = "auditor.audit"
TASK_EXTRACT = "auditor.extract"
TASK_CALIBRATE = "auditor.calibrate"


class WorkerUnavailable(AuditorError):
    """No worker answered in time, or the broker is down."""


class BrokerUnavailable(WorkerUnavailable):
    """The task could not be queued at all: nothing will ever run it."""


class Dispatcher(Protocol):
    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict: ...

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None: ...


def make_celery(settings: Settings, fail_fast: bool = False):
    """The Celery app both sides share: JSON only, acks late, one task prefetched (DESIGN.md).

    `fail_fast` is the API's side: while Redis is away a request should hear 503 within a
    couple of seconds, not after Celery's default 20 reconnect attempts (~20 s). Workers keep
    the patient defaults: their results are worth waiting for."""
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
        redis_socket_connect_timeout=5,
    )
    if fail_fast:
        app.conf.update(
            result_backend_transport_options={
                "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
            },
            task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
            broker_connection_timeout=3,
        )
    return app


def _connection_errors() -> tuple[type[Exception], ...]:
    """What the broker or the Redis result backend raise while Redis is away. RuntimeError is
    Celery's "result consumer could not reconnect" (celery/backends/asynchronous.py)."""
    from kombu.exceptions import OperationalError

    errors: tuple[type[Exception], ...] = (OperationalError, OSError, RuntimeError)
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # a non-Redis result backend
        return errors
    return (*errors, RedisConnectionError, RedisTimeoutError)


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


class CeleryDispatcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = make_celery(settings, fail_fast=True)
        self._reset_lock = threading.Lock()

    def _reset(self, broken) -> None:
        """Celery's Redis result consumer gives up for good after a failed reconnect ("the
        Celery application must be restarted"): swap in a fresh app so the API recovers by
        itself when Redis is back, instead of answering 503 until someone restarts it."""
        with self._reset_lock:
            if self.app is broken:
                self.app = make_celery(self.settings, fail_fast=True)
                try:
                    broken.close()
                except Exception:  # already broken; closing is best effort
                    pass

    def _send(self, task: str, args: list[Any], task_id: str):
        app = self.app
        try:
            return app.send_task(task, args=args, task_id=task_id)
        except _connection_errors() as exc:
            self._reset(app)
            raise BrokerUnavailable(f"broker unavailable at {_safe_url(self.settings.broker_url)}: {_first_line(exc)}") from exc

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        self._send(task, args, task_id)

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        from celery.exceptions import TimeoutError as CeleryTimeout

        app = self.app
        result = self._send(task, args, task_id)
        try:
            return result.get(timeout=timeout, propagate=True)
        except CeleryTimeout as exc:
            raise WorkerUnavailable(f"no worker finished {task} for {task_id} within {timeout:.0f}s") from exc
        except _connection_errors() as exc:
            # Queued, but the result backend went away while we waited: the worker may still
            # finish it, and its scores will land in the database either way.
            self._reset(app)
            raise WorkerUnavailable(f"lost the result backend while waiting for {task_id}: {_first_line(exc)}") from exc
