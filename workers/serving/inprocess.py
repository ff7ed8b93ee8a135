"""The embedded default's worker: the same task functions on a thread pool in the API process
(no broker). The task threads wait on the one model thread, which batches them.

Tasks waiting for a thread are bounded (AUDITOR_MAX_QUEUED_TASKS): past it a submission is
refused as a broker would be unreachable (503 + Retry-After, its rows marked "not queued"), so a
flood of audits cannot grow the queue, and the process's memory, without end."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from auditor.errors import BrokerUnavailable, WorkerUnavailable
from auditor.queue.dispatch import TASK_AUDIT, TASK_CALIBRATE, TASK_EXTRACT, TASK_GENERATE
from auditor.queue.streams import LocalStreams
from auditor.settings import Settings
from workers.serving.audits import serve_audits
from workers.serving.context import WorkerContext
from workers.serving.generation import serve_generation
from workers.serving.jobs import serve_calibration, serve_extraction


class InProcessDispatcher:
    def __init__(self, settings: Settings, progress=None):
        self.streams = LocalStreams()  # streamed requests' tokens, to the API in this process
        self.runtime = WorkerContext(settings, progress, streams=self.streams)
        # Enough task threads to fill a batch, plus room for audits and admin jobs.
        self.threads = settings.batch_max_size + 4
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="auditor-task")
        self.max_queued = settings.max_queued_tasks
        self._pending = 0  # submitted and not finished (running or waiting for a thread)
        self._pending_lock = threading.Lock()
        self.tasks = {
            TASK_GENERATE: lambda request_id, payload: serve_generation(request_id, payload, self.runtime),
            TASK_AUDIT: lambda request_ids, items: serve_audits(request_ids, items, self.runtime),
            TASK_EXTRACT: lambda job_id: serve_extraction(job_id, self.runtime),
            TASK_CALIBRATE: lambda job_id: serve_calibration(job_id, self.runtime),
        }

    def warm_up(self) -> None:
        """Load the model and build the calibrated bank now, not on the first request."""
        self.runtime.model_thread.call(self.runtime.warm_up).result()

    def _submit(self, task: str, arg_lists: list[list[Any]]) -> list[Future]:
        """All of `arg_lists` queued, or none (BrokerUnavailable: no room for them all)."""
        with self._pending_lock:
            if self._pending + len(arg_lists) > self.threads + self.max_queued:
                raise BrokerUnavailable(
                    f"the in-process worker has {self.max_queued} tasks waiting already (AUDITOR_MAX_QUEUED_TASKS)"
                )
            self._pending += len(arg_lists)
        futures = [self.pool.submit(self.tasks[task], *args) for args in arg_lists]
        for future in futures:
            future.add_done_callback(self._done)
        return futures

    def _done(self, _future: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        self._submit(task, [args])

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        return self.run_many(task, [args], task_ids=[task_id], timeout=timeout)[0]

    def run_many(self, task: str, arg_lists: list[list[Any]], *, task_ids: list[str], timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        futures = self._submit(task, arg_lists)
        results = []
        for task_id, future in zip(task_ids, futures):
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout as exc:
                for waiting in futures:
                    waiting.cancel()  # those not started yet never will (the API sets cancel marks for the rest)
                raise WorkerUnavailable(f"{task} for {task_id} did not finish within {timeout:.0f}s") from exc
        return results
