"""Worker heartbeats in Redis: how readiness knows a worker can serve without asking it.

Each `auditor worker` process writes `auditor:worker:<host>:<pid>` every few seconds with a short
expiry: its warm-up state (loading the model, calibrating with counts, ready) and model. The API's
`/readyz` reads the keys (one SCAN, cached for a second) instead of broadcasting a Celery ping
per call, and answers ready only once some worker has finished calibrating, so an orchestrator
does not send traffic to a deployment whose first answer would wait minutes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "auditor:worker:"
INTERVAL_SECONDS = 5.0
TTL_SECONDS = 20


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


class HeartbeatPublisher:
    """A daemon thread that publishes `snapshot()` until stopped (or the process dies: the key
    expires after TTL_SECONDS)."""

    def __init__(self, url: str, snapshot: Callable[[], dict], interval: float = INTERVAL_SECONDS):
        self.key = f"{KEY_PREFIX}{socket.gethostname()}:{os.getpid()}"
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._snapshot, self._interval = snapshot, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auditor-heartbeat", daemon=True)

    def start(self) -> HeartbeatPublisher:
        self._thread.start()
        return self

    def beat(self) -> None:
        payload = {**self._snapshot(), "pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}
        self._client.set(self.key, json.dumps(payload), ex=TTL_SECONDS)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis away: readiness says so by the key expiring
                log.debug("heartbeat not written: %s", exc)
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._client.delete(self.key)
        except redis.RedisError:
            pass


class HeartbeatReader:
    """The live workers' heartbeats, read at most once per `cache_seconds`."""

    def __init__(self, url: str, cache_seconds: float = 1.0):
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[dict]] | None = None

    def workers(self) -> list[dict]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._cache_seconds:
                return self._cached[1]
            keys = list(self._client.scan_iter(match=f"{KEY_PREFIX}*", count=100))
            values = self._client.mget(keys) if keys else []
            beats = [json.loads(v) for v in values if v is not None]
            self._cached = (now, beats)
            return beats
