"""How the API hands work to a worker without importing (or running) the model.

`CeleryDispatcher` sends tasks by name over the broker; the composition root (`auditor run`)
injects an in-process dispatcher instead for the embedded default.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from auditor import sealing
from auditor.errors import BrokerUnavailable, WorkerUnavailable
from auditor.privacy import task_argsrepr
from auditor.settings import Settings

TASK_GENERATE = "auditor.generate"
TASK_AUDIT = "auditor.audit"
TASK_EXTRACT = "auditor.extract"
TASK_CALIBRATE = "auditor.calibrate"
TASK_RETENTION = "auditor.retention"  # scheduled by `auditor beat` (see _beat_schedule)
# The argument of each task that carries prompts and completions: sealed outside full mode.
TEXT_ARGUMENT = {TASK_GENERATE: 1, TASK_AUDIT: 1}


class Dispatcher(Protocol):
    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict: ...

    def run_many(self, task: str, arg_lists: list[list[Any]], *, task_ids: list[str], timeout: float) -> list[dict]:
        """`run` for several tasks at once: all queued, then each waited for (`timeout` in all)."""
        ...

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None: ...


def make_celery(settings: Settings, fail_fast: bool = False):
    """The Celery app both sides share: JSON only, acks late, one task prefetched (DESIGN.md).

    `fail_fast` is the API's side: while Redis is away a request should hear 503 within a
    couple of seconds, not after Celery's default 20 reconnect attempts (~20 s). Workers keep
    the patient defaults: their results are worth waiting for."""
    from celery import Celery

    _closed_redis_channels_raise_connection_errors()
    app = Celery("auditor", broker=settings.broker_url, backend=settings.result_backend or settings.broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=_broker_transport_options(settings),
        result_expires=3600,
        task_track_started=True,
        redis_socket_connect_timeout=5,
        task_protocol=2,
        beat_schedule=_beat_schedule(settings),  # protocol 2 carries argsrepr (privacy)
    )
    if fail_fast:
        app.conf.update(
            result_backend_transport_options={
                "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
            },
            task_publish_retry_policy={
                "max_retries": 2,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.5,
            },
            broker_connection_timeout=3,
        )
    return app


def _beat_schedule(settings: Settings) -> dict[str, Any]:
    """What `auditor beat` sends: the retention job every `retention_interval_seconds`, unless
    retention is off. Runs sent while no worker listened expire rather than pile up (any one
    run catches up on everything)."""
    if settings.retention_days <= 0 or settings.retention_interval_seconds <= 0:
        return {}
    interval = settings.retention_interval_seconds
    return {"retention": {"task": TASK_RETENTION, "schedule": interval, "options": {"expires": max(interval, 60.0)}}}


def _closed_redis_channels_raise_connection_errors() -> None:
    """Work around kombu 5.7 / Celery 5.7: after the broker connection drops, a worker closes
    the connection (clearing its transport's `client`), but its Redis channel is still used to
    acknowledge the tasks that were running (acks are late) and to restore unacked messages.
    The channel then builds a Redis client from the cleared `client` and raises AttributeError,
    which Celery treats as unrecoverable: every worker busy when Redis restarts exits
    (tests/service/test_faults.py caught it; reproduced with a bare Celery app). Raise the connection
    error it really is instead: Celery logs the failed ack and reconnects; a Redis that kept the
    unacked task redelivers it after the visibility timeout (recorded once: workers.serving.transactions).
    Idempotent. Drop it once a kombu/Celery release fixes this (5.7.0 of both is the newest as
    of writing): the Redis test in tests/service/test_faults.py fails without it."""
    try:
        from kombu.transport import redis as kombu_redis
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # no Redis transport installed: nothing to mend
        return
    original = kombu_redis.Channel._connparams
    if getattr(original, "_auditor_patched", False):
        return

    def _connparams(self, *args, **kwargs):
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("this broker channel's connection is closed")
        return original(self, *args, **kwargs)

    _connparams._auditor_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams


def _broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Redis re-delivers a task that no worker acknowledged within the visibility timeout (a
    worker killed mid-task: acks are late), so the timeout must exceed the longest task (see
    Settings.task_visibility_timeout). Workers look for such tasks every
    `unacked_restore_interval` seconds; kombu's default throttle scans on only every 10th look
    (~100 s), which would leave a dead worker's requests waiting long past the timeout, so scan
    on each one (one cheap sorted-set range query)."""
    timeout = settings.task_visibility_timeout
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": max(1, min(10, timeout // 5)),
        "unacked_restore_throttle": 1,
    }


# While Redis is away, how often a waiting request tries to reach it again.
_RECONNECT_PAUSE_SECONDS = 0.5


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
        self.sealer = sealing.sealer(settings)  # outside full mode, texts cross Redis sealed
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
        if (index := TEXT_ARGUMENT.get(task)) is not None:
            args = [*args[:index], self.sealer.seal(args[index]), *args[index + 1 :]]
        try:
            # argsrepr: what worker logs, events and `celery inspect` show of the arguments —
            # ids, never the prompts and completions the message itself carries.
            return app.send_task(task, args=args, task_id=task_id, argsrepr=task_argsrepr(args), kwargsrepr="{}")
        except _connection_errors() as exc:
            self._reset(app)
            raise BrokerUnavailable(
                f"broker unavailable at {_safe_url(self.settings.broker_url)}: {_first_line(exc)}"
            ) from exc

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        self._send(task, args, task_id)

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        """Queue `task` and wait up to `timeout` seconds in all for its result.

        BrokerUnavailable if it cannot be queued: nothing will run it, the caller answers 503.
        Once queued, the request is the API's to finish, even across a Redis restart: when Redis
        goes away while we wait, keep trying to reach it and wait on for the same task id until
        the deadline. A Redis that comes back without a trace of the task (restarted without
        persistence: the queued message and any stored result are gone) gets it again under the
        same id. Running a request twice costs work, never a second record: workers record a
        request once and answer a repeat with the recorded result (workers.serving.transactions). A worker
        killed mid-task needs nothing here: Redis re-delivers its task to another worker after
        the visibility timeout, and that worker's result reaches us under the same id."""
        deadline = time.monotonic() + timeout
        return self._wait(task, args, task_id, self._send(task, args, task_id), deadline, timeout)

    def run_many(self, task: str, arg_lists: list[list[Any]], *, task_ids: list[str], timeout: float) -> list[dict]:
        """All queued first (a worker batches what arrives together), then each waited for as
        `run` waits, within one deadline."""
        deadline = time.monotonic() + timeout
        sent = [self._send(task, args, task_id) for args, task_id in zip(arg_lists, task_ids)]
        return [
            self._wait(task, args, task_id, result, deadline, timeout)
            for args, task_id, result in zip(arg_lists, task_ids, sent)
        ]

    def _wait(self, task: str, args: list[Any], task_id: str, result, deadline: float, timeout: float) -> dict:
        from celery.exceptions import TimeoutError as CeleryTimeout

        lost: Exception | None = None  # the last connection error, while Redis is away
        while True:
            app = self.app
            try:
                if lost is not None:
                    result = app.AsyncResult(task_id)
                    if result.state == "PENDING":  # unknown to this Redis: its message may be gone
                        self._send(task, args, task_id)
                value = result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
            except CeleryTimeout as exc:
                raise WorkerUnavailable(f"no worker finished {task} for {task_id} within {timeout:.0f}s") from exc
            except (BrokerUnavailable, *_connection_errors()) as exc:
                if not isinstance(exc, BrokerUnavailable):
                    self._reset(app)
                lost = exc
            else:
                result.maybe_throw()  # the task's own failure, whatever its type: not a lost Redis
                return self.sealer.open(value)
            if time.monotonic() + _RECONNECT_PAUSE_SECONDS >= deadline:
                raise WorkerUnavailable(
                    f"lost the broker while waiting for {task_id} and it did not come back "
                    f"within {timeout:.0f}s: {_first_line(lost)}"
                ) from lost
            time.sleep(_RECONNECT_PAUSE_SECONDS)
