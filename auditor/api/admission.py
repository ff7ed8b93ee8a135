"""How many generations one API process holds at once, overall and per token.

A non-streamed completion holds one of the server's threads while it waits for a worker (for up
to REQUEST_TIMEOUT); a streamed one holds a worker's batch slot and a channel for as long as its
client reads. Without a bound, enough long completions occupy every thread and the control
routes (`/healthz`, `/readyz`, admin) stop answering. Beyond the bound a request is refused at
once with 429 and `Retry-After`, as TGI's `--max-concurrent-requests` does, before anything is
written or queued. Per token as well, so one client cannot take the whole deployment's share.

A streamed response outlives its route handler: the handler `keep()`s its admission, and the
stream releases it when it ends (however it ends).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request

from auditor.access.tokens import Principal
from auditor.api.security import PrincipalDep
from auditor.errors import TooManyRequests

RETRY_AFTER_SECONDS = 2


class InFlight:
    """Counters of requests in flight; thread-safe (sync routes run on a thread pool)."""

    def __init__(self, total: int, per_token: int):
        self.total, self.per_token = total, per_token  # 0 = no bound
        self._lock = threading.Lock()
        self._count = 0
        self._by_token: Counter[int] = Counter()

    def acquire(self, token_id: int) -> str | None:
        """None when admitted; otherwise which bound is reached."""
        with self._lock:
            if self.total and self._count >= self.total:
                return f"this deployment is serving its limit of {self.total} concurrent requests"
            if self.per_token and self._by_token[token_id] >= self.per_token:
                return f"this token has its limit of {self.per_token} concurrent requests in flight"
            self._count += 1
            self._by_token[token_id] += 1
            return None

    def release(self, token_id: int) -> None:
        with self._lock:
            self._count -= 1
            self._by_token[token_id] -= 1
            if self._by_token[token_id] <= 0:
                del self._by_token[token_id]

    @property
    def count(self) -> int:
        return self._count


class Admission:
    """One admitted request's place in the counters, released exactly once."""

    def __init__(self, in_flight: InFlight, principal: Principal):
        self.in_flight, self.principal = in_flight, principal
        self.kept = False
        self._released = False
        self._lock = threading.Lock()

    def keep(self) -> Admission:
        """The response outlives the handler (a stream): whoever holds this releases it."""
        self.kept = True
        return self

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.in_flight.release(self.principal.token_id)


def _admitted(request: Request, principal: PrincipalDep) -> Iterator[Admission]:
    in_flight: InFlight = request.app.state.in_flight
    if (refused := in_flight.acquire(principal.token_id)) is not None:
        raise TooManyRequests(f"{refused}; retry shortly", retry_after=RETRY_AFTER_SECONDS)
    admission = Admission(in_flight, principal)
    try:
        yield admission
    finally:
        if not admission.kept:
            admission.release()


AdmittedDep = Annotated[Admission, Depends(_admitted)]
