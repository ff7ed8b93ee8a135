"""The stacks real third-party OpenAI clients talk to, each started once for tests/clients/ and
every client test run against both:

- `in-process`: the API over real HTTP with an in-process worker and the real model on SQLite,
  composed as `auditor run` composes it (`create_app(settings, InProcessDispatcher(settings))`);
- `redis-worker`: the API in front of a real `auditor worker` process on Redis and Postgres, as
  the compose deployment runs (tests/support/worker_stack.py); skipped when either is down.

Divergence flags, drift and retention are off: these tests check what the clients send and read,
not flag quality (tests/workers/test_monitoring.py fits the null of ordinary answers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Stack:
    base_url: str  # http://127.0.0.1:PORT (no /v1)
    token: str  # scope client
    db_url: str

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def request_rows(self) -> int:
        """Rows in `requests`: one per completion the API accepted (a refused one writes none)."""
        from sqlalchemy import func, select

        from auditor.db.engine import make_engine, session_factory
        from auditor.db.models import MonitoredRequest

        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as session:
                return session.scalar(select(func.count()).select_from(MonitoredRequest))
        finally:
            engine.dispose()


@pytest.fixture(scope="package", params=["in-process", "redis-worker"])
def stack(request, host, tmp_path_factory) -> Iterator[Stack]:
    if request.param == "redis-worker":
        yield from _redis_worker_stack(host, tmp_path_factory)
        return
    from auditor.api.main import create_app
    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from support.auth import issue_token
    from support.http_server import serving
    from workers.serving.inprocess import InProcessDispatcher

    url = f"sqlite:///{tmp_path_factory.mktemp('clients-db') / 'auditor.db'}"
    run_migrations(url)
    settings = Settings(
        database_url=url,
        data_dir=host.settings.data_dir,  # the session's extracted vectors
        divergence_flags=False,
        drift_interval_seconds=0,
        retention_interval_seconds=0,
        request_timeout=300,
    )
    dispatcher = InProcessDispatcher(settings)
    dispatcher.runtime.host.__dict__["model"] = host.model  # share the session's loaded weights
    dispatcher.warm_up()
    app = create_app(settings, dispatcher)
    token = issue_token(url, scopes=["client"], name="third-party-clients")
    with serving(app) as base_url:
        yield Stack(base_url=base_url, token=token, db_url=url)


def _redis_worker_stack(host, tmp_path_factory) -> Iterator[Stack]:
    from support.auth import issue_token
    from support.worker_stack import worker_stack

    env = {"AUDITOR_DIVERGENCE_FLAGS": "false", "AUDITOR_DRIFT_INTERVAL_SECONDS": "0"}
    with worker_stack(tmp_path_factory, host.settings.data_dir, env, request_timeout=300) as served:
        token = issue_token(served.db_url, scopes=["client"], name="third-party-clients")
        yield Stack(base_url=served.base_url, token=token, db_url=served.db_url)


@pytest.fixture(scope="package")
def openai_client(stack):
    import openai

    with openai.OpenAI(base_url=stack.v1, api_key=stack.token, max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="package")
def tokenizer_dir(host, tmp_path_factory) -> Path:
    """The served model's own tokenizer as a local HF directory: what lm-eval's
    `tokenizer_backend=huggingface` loads instead of a hub download, so its token counts (the
    context length of a loglikelihood request) are the server's."""
    path = tmp_path_factory.mktemp("served-tokenizer")
    host.model.tokenizer.save_pretrained(path)
    return path
