"""The embedded default's worker: the same task functions on one background thread in the API
process (no broker). One thread, because one model serves one request at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from auditor.dispatch import TASK_AUDIT, TASK_GENERATE, WorkerUnavailable
from auditor.settings import Settings
from workers import service


class InProcessDispatcher:
    def __init__(self, settings: Settings):
        self.runtime = service.Runtime(settings)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditor-worker")
        self.tasks = {
            TASK_GENERATE: lambda request_id, payload: service.serve_generation(request_id, payload, self.runtime),
            TASK_AUDIT: lambda request_ids, items: service.serve_audits(request_ids, items, self.runtime),
        }

    def warm_up(self) -> None:
        """Load the model and build the calibrated bank now, not on the first request."""
        self.pool.submit(self.runtime.bank).result()

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        self.pool.submit(self.tasks[task], *args)

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        future = self.pool.submit(self.tasks[task], *args)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout as exc:
            raise WorkerUnavailable(f"{task} for {task_id} did not finish within {timeout:.0f}s") from exc
