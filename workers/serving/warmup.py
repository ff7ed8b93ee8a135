"""What a worker is doing before it can serve: loading the model, registering concepts,
calibrating. Readiness reports it (`/readyz`, and the worker heartbeat), and each long step is
a progress bar on a terminal (`auditor run`) or a log line every ~10 % with the time left."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

StepProgress = Callable[[str, int], Callable[[int], None]]


class WarmUpState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.current = "starting"
        self.step: str | None = None
        self.done = 0
        self.total = 0
        self.is_ready = False

    def phase(self, name: str) -> None:
        with self._lock:
            self.current, self.step, self.done, self.total = name, None, 0, 0
        log.info("warm-up: %s", name)

    def ready(self) -> None:
        with self._lock:
            self.current, self.step, self.is_ready = "ready", None, True
        log.info("warm-up: ready after %.0fs", time.time() - self.started)

    def snapshot(self) -> dict:
        with self._lock:
            out = {"ready": self.is_ready, "phase": self.current, "seconds": round(time.time() - self.started, 1)}
            if self.step is not None:
                out.update(step=self.step, done=self.done, total=self.total)
            return out

    def progress(self, outer: StepProgress | None = None) -> StepProgress:
        """A StepProgress that records each step here and forwards it to `outer` (a rich bar),
        or logs it when there is none."""

        def start(description: str, total: int) -> Callable[[int], None]:
            with self._lock:
                self.step, self.done, self.total = description, 0, total
            forward = outer(description, total) if outer is not None else None
            began, next_log = time.monotonic(), [0.1]

            def advance(n: int) -> None:
                with self._lock:
                    self.done += n
                    done = self.done
                if forward is not None:
                    forward(n)
                elif total and done / total >= next_log[0]:
                    elapsed = time.monotonic() - began
                    left = elapsed * (total - done) / max(done, 1)
                    log.info("%s: %d/%d, about %.0fs left", description, done, total, left)
                    next_log[0] = done / total + 0.1

            return advance

        return start
