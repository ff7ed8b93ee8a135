"""The production path for tests: the API over real HTTP in front of a real `auditor worker`
(Celery) process, on real Redis (broker, results and stream channel) and a fresh Postgres
database. Skips, with the reason, when Postgres or Redis is unreachable."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support.databases import Databases, _postgres_reachable
from support.http_server import free_port, serving

REDIS_HOST = "127.0.0.1"


def redis_reachable() -> str | None:
    """None when Redis answers; otherwise why not (the skip message)."""
    import redis

    try:
        redis.Redis(host=REDIS_HOST, port=6379, socket_connect_timeout=2).ping()
        return None
    except Exception as exc:
        return f"Redis unreachable at {REDIS_HOST}:6379: {exc}"


@dataclass
class WorkerStack:
    base_url: str
    db_url: str
    broker_url: str
    app: object
    token: str
    worker: subprocess.Popen
    worker_metrics: str  # the worker's /metrics


def wait_for_warm_up(worker: subprocess.Popen, log_path: Path, metrics_url: str, timeout: float = 900) -> None:
    """A worker answers pings before its model, calibration and control thresholds are ready;
    it reports `auditor_worker_up 1` once they are. Waiting here keeps that one-off cost (long
    on a busy machine) out of the first test's request timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited: {log_path.read_text()[-4000:]}"
        try:
            if any(
                line.startswith("auditor_worker_up{") and line.endswith(" 1.0")
                for line in httpx.get(metrics_url, timeout=5).text.splitlines()
            ):
                return
        except httpx.HTTPError:
            pass  # the metrics server starts with the process; the warm-up comes after
        time.sleep(1)
    raise AssertionError("worker did not finish warming up")


@contextmanager
def worker_stack(tmp_path_factory, data_dir: Path, env: dict[str, str], **settings) -> Iterator[WorkerStack]:
    """API + one worker process. `env` and `settings` are the worker's and the API's extra
    configuration (AUDITOR_* variables, Settings fields)."""
    for reason in (_postgres_reachable(), redis_reachable()):
        if reason:
            pytest.skip(reason)
    import redis

    from auditor.api.main import create_app
    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from support.auth import issue_token

    redis_db = random.randint(1, 15)
    redis.Redis(host=REDIS_HOST, db=redis_db).flushdb()
    databases = Databases("postgres", tmp_path_factory.mktemp("worker-stack-db"))
    db_url = databases.new_url()
    run_migrations(db_url)
    broker = f"redis://{REDIS_HOST}:6379/{redis_db}"
    metrics_port = free_port()
    worker_env = {
        **os.environ,
        "AUDITOR_DATABASE_URL": db_url,
        "AUDITOR_BROKER_URL": broker,
        "AUDITOR_DATA_DIR": str(data_dir),
        "AUDITOR_TORCH_THREADS": "2",
        "AUDITOR_WORKER_METRICS_PORT": str(metrics_port),
        **env,
    }
    # The log goes to a file: an unread pipe fills up and blocks the worker on its next write.
    log_path = tmp_path_factory.mktemp("worker-log") / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "auditor.cli", "worker", "--loglevel", "WARNING"],
        env=worker_env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker.log_path = log_path
    app = create_app(Settings(database_url=db_url, broker_url=broker, data_dir=data_dir, **settings))
    token = issue_token(db_url, name="worker-stack")
    try:
        with serving(app) as base_url:
            deadline = time.monotonic() + 120
            while not app.state.dispatcher.app.control.ping(timeout=1.0):
                assert worker.poll() is None, f"worker exited: {log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "worker did not come up"
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            wait_for_warm_up(worker, log_path, metrics_url)
            yield WorkerStack(base_url, db_url, broker, app, token, worker, metrics_url)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        databases.drop_all()
        redis.Redis(host=REDIS_HOST, db=redis_db).flushdb()  # leave no task results behind
