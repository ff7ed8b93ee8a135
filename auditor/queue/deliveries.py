"""How many times a task has been handed to a worker: the guard against a poison message.

Acks are late and a task whose worker dies is delivered again (`task_reject_on_worker_lost`):
right for a worker killed by a deploy, wrong for a request that itself kills the worker (out of
memory): it would come back, and take the next worker down, forever. Each task start counts its
deliveries in Redis (`auditor:deliveries:{task id}`, kept a little longer than a redelivery can
take); past MAX_DELIVERIES the task is failed with the reason instead of run.
"""

from __future__ import annotations

import threading

# One worker lost to a deploy or a crash is routine; the third in a row is the request.
MAX_DELIVERIES = 3


def delivery_key(task_id: str) -> str:
    return f"auditor:deliveries:{task_id}"


class DeliveryCounter:
    def __init__(self, url: str, ttl_seconds: int):
        self.url, self.ttl = url, ttl_seconds
        self._client = None
        self._lock = threading.Lock()

    def _redis(self):
        with self._lock:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=10)
            return self._client

    def count(self, task_id: str) -> int:
        """This delivery's number: 1 the first time the task starts."""
        pipe = self._redis().pipeline(transaction=True)
        pipe.incr(delivery_key(task_id))
        pipe.expire(delivery_key(task_id), self.ttl)
        deliveries, _ = pipe.execute()
        return int(deliveries)


def too_many(deliveries: int) -> str | None:
    """Why a task must not run again, or None."""
    if deliveries <= MAX_DELIVERIES:
        return None
    return (
        f"delivered {deliveries} times: each of the {deliveries - 1} runs before lost its worker (killed, "
        "perhaps out of memory), so it is not run again"
    )
