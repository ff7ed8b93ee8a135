"""Overload: completions beyond the deployment's or a token's bound are refused at once with
429 and Retry-After, and the control routes keep answering while the bound is held. Real HTTP,
SQLite, and a dispatcher that holds each completion until the test lets it go."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from auditor.api.main import create_app
from auditor.db.engine import run_migrations
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.databases import Databases
from support.http_server import serving

BODY = {"model": "auditor", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class HeldDispatcher:
    """Answers every completion once `release` is set, as a worker would after generating."""

    def __init__(self):
        self.release = threading.Event()
        self.waiting = 0

    def run(self, task, args, *, task_id, timeout):
        self.waiting += 1
        assert self.release.wait(timeout=60), "the test never released the held completions"
        return {
            "request_id": task_id,
            "text": "hello",
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "scores": {},
            "flags": [],
            "alerts": [],
            "monitor": {"status": "off"},
        }

    def submit(self, task, args, *, task_id):
        return None


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _held_app(tmp_path, **bounds):
    """An app on a fresh SQLite database whose dispatcher holds every completion."""
    databases = Databases("sqlite", tmp_path)
    url = databases.new_url()
    run_migrations(url)
    dispatcher = HeldDispatcher()
    app = create_app(Settings(database_url=url, data_dir=tmp_path / "data", **bounds), dispatcher)
    return databases, url, dispatcher, app


def test_completions_past_the_bounds_get_429_and_the_control_routes_still_answer(tmp_path):
    databases, url, dispatcher, app = _held_app(tmp_path, max_concurrent_requests=2, max_concurrent_per_token=1)
    first, second, third = (issue_token(url, scopes=["client"], name=n) for n in ("first", "second", "third"))
    admin = issue_token(url, name="admin")
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http, ThreadPoolExecutor(4) as pool:

        def chat(token):
            return http.post("/v1/chat/completions", json=BODY, headers=bearer(token))

        held_first = pool.submit(chat, first)
        _wait_for(lambda: dispatcher.waiting == 1)
        same_token = chat(first)  # the token's bound (1) is held
        assert same_token.status_code == 429 and same_token.headers["retry-after"] == "2", same_token.text
        assert "this token has its limit of 1" in same_token.json()["error"]["message"]

        held_second = pool.submit(chat, second)
        _wait_for(lambda: dispatcher.waiting == 2)
        deployment = chat(third)  # the deployment's bound (2) is held
        assert deployment.status_code == 429 and "limit of 2 concurrent" in deployment.json()["error"]["message"]

        assert http.get("/healthz").status_code == 200
        assert http.get("/admin/concepts", headers=bearer(admin)).status_code == 200
        dispatcher.release.set()
        assert held_first.result(timeout=30).status_code == 200
        assert held_second.result(timeout=30).status_code == 200
        # A request leaves the count when its handler's dependencies close, just after its
        # response is sent: then the bound admits again.
        _wait_for(lambda: app.state.in_flight.count == 0)
        assert chat(first).status_code == 200
    databases.drop_all()


def test_the_control_routes_answer_while_more_completions_wait_than_the_server_has_threads(tmp_path):
    """The server's own pool has 40 threads; 45 completions waiting on a worker hold none of them
    (they wait on the completions' pool), so /healthz and admin still answer at once."""
    databases, url, dispatcher, app = _held_app(tmp_path, max_concurrent_requests=64, max_concurrent_per_token=64)
    client, admin = issue_token(url, scopes=["client"], name="client"), issue_token(url, name="admin")
    limits = httpx.Limits(max_connections=100)
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=60, limits=limits) as http:
        with ThreadPoolExecutor(45) as pool:
            held = [
                pool.submit(lambda: http.post("/v1/chat/completions", json=BODY, headers=bearer(client)))
                for _ in range(45)
            ]
            _wait_for(lambda: dispatcher.waiting == 45, timeout=30)
            started = time.monotonic()
            assert http.get("/healthz", timeout=5).status_code == 200
            assert http.get("/admin/concepts", headers=bearer(admin), timeout=5).status_code == 200
            assert time.monotonic() - started < 5
            dispatcher.release.set()
            assert [f.result(timeout=60).status_code for f in held] == [200] * 45
    databases.drop_all()


def test_the_in_process_worker_refuses_tasks_past_its_queue_bound(tmp_path):
    """The embedded default's task queue is bounded: past its threads and AUDITOR_MAX_QUEUED_TASKS
    a submission is refused as a broker would be (BrokerUnavailable: the route's 503, rows
    "not queued"), all of a batch or none; finished tasks make room again."""
    from auditor.errors import BrokerUnavailable
    from auditor.queue.dispatch import TASK_AUDIT
    from workers.serving.inprocess import InProcessDispatcher

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}", data_dir=tmp_path / "data", batch_max_size=1, max_queued_tasks=2
    )
    dispatcher = InProcessDispatcher(settings)  # no model is loaded until a task needs it
    release, ran = threading.Event(), []
    dispatcher.tasks[TASK_AUDIT] = lambda *args: (release.wait(30), ran.append(args))
    room = dispatcher.threads + 2  # 5 threads running, 2 waiting
    for i in range(room - 2):
        dispatcher.submit(TASK_AUDIT, [i], task_id=str(i))
    try:
        dispatcher.run_many(TASK_AUDIT, [[97], [98], [99]], task_ids=["97", "98", "99"], timeout=1)
    except BrokerUnavailable:
        pass
    else:
        raise AssertionError("three tasks were queued where there was room for two")
    dispatcher.submit(TASK_AUDIT, ["a"], task_id="a")
    dispatcher.submit(TASK_AUDIT, ["b"], task_id="b")
    try:
        dispatcher.submit(TASK_AUDIT, ["c"], task_id="c")
    except BrokerUnavailable as exc:
        assert "AUDITOR_MAX_QUEUED_TASKS" in str(exc)
    else:
        raise AssertionError("a task past the bound was queued")
    release.set()
    _wait_for(lambda: len(ran) == room)
    _wait_for(lambda: dispatcher._pending == 0)
    dispatcher.submit(TASK_AUDIT, ["again"], task_id="again")  # room again
    _wait_for(lambda: len(ran) == room + 1)
    assert sorted(str(args[0]) for args in ran) == sorted([*map(str, range(room - 2)), "a", "b", "again"])


def test_bad_streaming_and_idempotency_input_is_a_4xx_that_writes_nothing(tmp_path):
    """A deployment with a worker but no stream channel (a broker that is not Redis) refuses
    `stream` with a 400 naming it; an Idempotency-Key past 255 characters is a 422 on the header.
    Neither writes a request row nor reaches the worker."""
    from sqlalchemy import func, select

    from auditor.db.engine import make_engine, session_factory
    from auditor.db.models import MonitoredRequest

    databases, url, dispatcher, app = _held_app(tmp_path)
    assert app.state.streams is None
    client = issue_token(url, scopes=["client"], name="client")
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30, headers=bearer(client)) as http:
        streamed = http.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream", streamed.text
        long_key = http.post("/v1/chat/completions", json=BODY, headers={"Idempotency-Key": "k" * 256})
        assert long_key.status_code == 422 and "idempotency-key" in long_key.text.lower(), long_key.text
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            assert session.scalar(select(func.count()).select_from(MonitoredRequest)) == 0
    finally:
        engine.dispose()
    assert dispatcher.waiting == 0
    databases.drop_all()
