"""`auditor_queue_depth{queue}`: tasks waiting in each Celery queue, read from a Redis broker when
Prometheus scrapes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from auditor.telemetry.labels import label_value

log = logging.getLogger(__name__)

QUEUE_DEPTH_NAME = "auditor_queue_depth"  # filled at scrape time by QueueDepthCollector
QUEUE_DEPTH_LABELS = ("queue",)
CELERY_DEFAULT_QUEUE = "celery"
# kombu's Redis transport keeps a task sent with priority p > 0 in a sibling list named
# f"{queue}\x06\x16{p}" (steps 3, 6, 9); the backlog is the sum of the lists.
_KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


class QueueDepthCollector(Collector):
    """`auditor_queue_depth{queue}`: tasks waiting in each Celery queue on a Redis broker.

    Read with LLEN when Prometheus scrapes, so it is current and costs nothing between scrapes.
    Every Redis call is bounded by `timeout` seconds with no retries; when the broker cannot be
    read the sample is left out (absent), never an exception that would fail the whole scrape."""

    def __init__(self, broker_url: str, queues: Iterable[str] = (CELERY_DEFAULT_QUEUE,), timeout: float = 0.5):
        self.broker_url = broker_url
        self.queues = tuple(queues)
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def describe(self) -> list[GaugeMetricFamily]:
        # Lets the registry check names without calling collect() (which would touch Redis).
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        try:
            depths = self.read_depths()
        except Exception as exc:  # broker down, DNS, auth, timeout: absent, not a failed scrape
            log.debug("queue depth unavailable from the broker: %s", exc)
            depths = {}
        for queue, depth in depths.items():
            family.add_metric([label_value(queue)], depth)
        yield family

    def read_depths(self) -> dict[str, int]:
        client = self._redis()
        pipe = client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
            for step in _KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEPARATOR}{step}")
        lengths = pipe.execute()
        per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
        return {queue: int(sum(lengths[i * per_queue : (i + 1) * per_queue])) for i, queue in enumerate(self.queues)}

    def _redis(self) -> Any:
        with self._lock:
            if self._client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                # redis-py retries 3 times by default: a scrape must not wait that long.
                self._client = redis.Redis.from_url(
                    self.broker_url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry=Retry(NoBackoff(), 0),
                )
            return self._client

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(QUEUE_DEPTH_NAME, "Tasks waiting in the Celery queue on the broker.", labels=["queue"])
