"""The channel a streamed generation travels on, from the worker's task thread to the API, keyed
by request id (DESIGN.md, "Streaming").

Two implementations of one contract:

- `RedisStreams` with a broker: the worker appends events to the Redis stream
  `auditor:stream:{request_id}` (XADD) and the API reads them with a blocking XREAD on an asyncio
  client, so a waiting request holds no server thread. A stream, not pub/sub: the API starts
  reading after the task is queued, and a stream keeps what was sent before anyone listened.
- `LocalStreams` for the embedded default (no broker): the same events through memory.

Cancelling goes the other way: the API sets `auditor:cancel:{request_id}` (or a mark in memory)
when a streaming client disconnects, or when it stops waiting for a non-streamed answer (its
timeout), and the worker's task thread polls it while the request runs.

Events are plain JSON dicts with a `type`: `delta` (text that will not change, the running
scores of the tokens so far, their log-probabilities when asked for), then one `done` (the same
answer a non-streamed request gets) or one `error` (what went wrong, its HTTP status).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

# How long a finished stream and a cancel mark are kept: a reader that arrives late still finds
# the whole stream, and nothing is kept for long.
TTL_SECONDS = 600
# The longest stream kept (events): far above any answer's tokens; a bound all the same.
MAX_EVENTS = 100_000


def redis_streams(settings) -> RedisStreams | None:
    """The stream channel of a deployment whose result backend (or broker) is Redis; its events
    sealed outside full privacy mode (auditor.sealing)."""
    from auditor.queue.heartbeat import is_redis
    from auditor.sealing import sealer

    url = settings.result_backend or settings.broker_url
    return RedisStreams(url, sealer(settings)) if url and is_redis(url) else None


class StreamTimeout(Exception):
    """No event arrived within the reader's deadline."""


def stream_key(request_id: str) -> str:
    return f"auditor:stream:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"auditor:cancel:{request_id}"


class StreamPublisher(Protocol):
    """The worker's side."""

    def publish(self, request_id: str, event: dict[str, Any]) -> None: ...

    def cancelled(self, request_id: str) -> bool: ...

    def forget(self, request_id: str) -> None:
        """The task will publish and poll no more for this request."""


class StreamReader(Protocol):
    """The API's side. `open` before the task is queued, `close` when done reading."""

    def open(self, request_id: str) -> None: ...

    def events(self, request_id: str, *, timeout: float) -> AsyncIterator[dict[str, Any]]: ...

    async def cancel(self, request_id: str) -> None: ...

    def cancel_now(self, request_id: str) -> None:
        """`cancel` from a thread (a non-streamed request the API stopped waiting for)."""

    def close(self, request_id: str) -> None: ...


class RedisStreams:
    """Both sides over Redis. The worker side uses a synchronous client (task threads); the API
    side an asyncio one, created on first use in the API's event loop."""

    def __init__(self, url: str, sealer=None):
        from auditor.sealing import Open

        self.url = url
        self.sealer = sealer or Open()  # events carry text: sealed outside full mode
        self._sync = None
        self._async = None
        self._lock = threading.Lock()

    # ---- the worker's side ----

    def _client(self):
        with self._lock:
            if self._sync is None:
                import redis

                self._sync = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=10)
            return self._sync

    def publish(self, request_id: str, event: dict[str, Any]) -> None:
        key = stream_key(request_id)
        pipe = self._client().pipeline(transaction=False)
        pipe.xadd(key, {"event": json.dumps(self.sealer.seal(event))}, maxlen=MAX_EVENTS, approximate=True)
        pipe.expire(key, TTL_SECONDS)
        pipe.execute()

    def cancelled(self, request_id: str) -> bool:
        return bool(self._client().exists(cancel_key(request_id)))

    def forget(self, request_id: str) -> None:
        """Nothing to free: the stream and the cancel mark expire by themselves."""

    # ---- the API's side ----

    def _aclient(self):
        if self._async is None:
            import redis.asyncio as aioredis

            self._async = aioredis.Redis.from_url(self.url, socket_connect_timeout=5)
        return self._async

    def open(self, request_id: str) -> None:
        """Nothing to prepare: the stream keeps what arrives before the first read."""

    async def events(self, request_id: str, *, timeout: float) -> AsyncIterator[dict[str, Any]]:
        """Every event of the request's stream, in order, until a `done` or `error`. StreamTimeout
        when the next event is not there by `timeout` seconds from the start."""
        client, key, last = self._aclient(), stream_key(request_id), "0-0"
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamTimeout(f"no worker finished {request_id} within {timeout:.0f}s")
            # Block in slices of at most 5 s: a slow answer never hangs on a dropped connection.
            found = await client.xread({key: last}, count=256, block=int(min(remaining, 5.0) * 1000))
            for _, entries in found:
                for entry_id, fields in entries:
                    last = entry_id
                    event = self.sealer.open(json.loads(fields[b"event"]))
                    yield event
                    if event["type"] in ("done", "error"):
                        return

    async def cancel(self, request_id: str) -> None:
        await self._aclient().set(cancel_key(request_id), 1, ex=TTL_SECONDS)

    def cancel_now(self, request_id: str) -> None:
        self._client().set(cancel_key(request_id), 1, ex=TTL_SECONDS)

    def close(self, request_id: str) -> None:
        """The stream expires by itself (TTL_SECONDS): a task re-run may still append to it."""


class _LocalStream:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.cancelled = False
        self.reader_done = False  # the API has stopped reading (`close`)
        self.task_done = False  # the task will publish and poll no more (`forget`)
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


class LocalStreams:
    """Both sides in one process (the embedded default). A stream lives from `open` until both
    its reader has closed it and its task has forgotten it; events for a request nobody opened
    (a non-streamed one) are dropped."""

    def __init__(self) -> None:
        self._streams: dict[str, _LocalStream] = {}
        self._cancelled: set[str] = set()  # marks of requests with no stream (non-streamed ones)
        self._lock = threading.Lock()

    def publish(self, request_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            stream.events.append(event)
            waiters = list(stream.waiters)
        for loop, ready in waiters:
            loop.call_soon_threadsafe(ready.set)

    def cancelled(self, request_id: str) -> bool:
        with self._lock:
            stream = self._streams.get(request_id)
            return request_id in self._cancelled or (stream is not None and stream.cancelled)

    def open(self, request_id: str) -> None:
        with self._lock:
            self._streams.setdefault(request_id, _LocalStream())

    async def events(self, request_id: str, *, timeout: float) -> AsyncIterator[dict[str, Any]]:
        with self._lock:
            stream = self._streams[request_id]
            ready = asyncio.Event()
            waiter = (asyncio.get_running_loop(), ready)
            stream.waiters.append(waiter)
        deadline, seen = time.monotonic() + timeout, 0
        try:
            while True:
                ready.clear()
                with self._lock:
                    fresh = stream.events[seen:]
                seen += len(fresh)
                for event in fresh:
                    yield event
                    if event["type"] in ("done", "error"):
                        return
                if fresh:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamTimeout(f"no worker finished {request_id} within {timeout:.0f}s")
                try:
                    await asyncio.wait_for(ready.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            with self._lock:
                stream.waiters.remove(waiter)

    async def cancel(self, request_id: str) -> None:
        self.cancel_now(request_id)

    def cancel_now(self, request_id: str) -> None:
        with self._lock:
            if (stream := self._streams.get(request_id)) is not None:
                stream.cancelled = True
            else:
                self._cancelled.add(request_id)

    def close(self, request_id: str) -> None:
        self._release(request_id, "reader_done")

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.discard(request_id)
        self._release(request_id, "task_done")

    def _release(self, request_id: str, side: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            setattr(stream, side, True)
            if stream.reader_done and stream.task_done:
                del self._streams[request_id]
