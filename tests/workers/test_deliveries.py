"""A task that keeps losing its workers (a request that kills the worker it runs on, e.g. out of
memory) is failed with the reason after MAX_DELIVERIES, not delivered forever. The real task
function, run eagerly under its task id, with its delivery count in real Redis; the generation
itself is replaced by a recorder (what is under test is whether it runs at all)."""

from __future__ import annotations

import random
from functools import partial

import pytest

from auditor.db import store
from auditor.db.engine import make_engine, run_migrations, session_factory
from auditor.errors import TaskRefused
from auditor.queue.deliveries import MAX_DELIVERIES, DeliveryCounter
from auditor.settings import Settings


def test_a_task_delivered_past_the_limit_is_failed_with_the_reason_and_not_run(tmp_path, monkeypatch):
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except Exception as exc:
        pytest.skip(f"Redis unreachable at 127.0.0.1:6379: {exc}")
    from workers import tasks
    from workers.serving.context import WorkerContext
    from workers.serving.generation import give_up

    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    run_migrations(url)
    engine = make_engine(url)
    with session_factory(engine)() as session:
        store.create_request(session, request_id="poison-1", kind="chat", prompt_text="hi")
        session.commit()
    runtime = WorkerContext(Settings(database_url=url, data_dir=tmp_path / "data"))  # no model is loaded
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    task_id = f"poison-{random.getrandbits(48):x}"
    monkeypatch.setattr(tasks, "DELIVERIES", DeliveryCounter(broker, ttl_seconds=60))
    monkeypatch.setattr(tasks, "give_up", partial(give_up, runtime=runtime))
    ran = []
    monkeypatch.setattr(tasks, "serve_generation", lambda request_id, payload: ran.append(request_id) or {})
    payload = {"messages": [{"role": "user", "content": "hi"}], "sampling": {}}
    try:
        for _ in range(MAX_DELIVERIES):  # each start counts: a worker killed mid-task never finishes
            tasks.generate_task.apply(args=["poison-1", payload], task_id=task_id).get()
        with pytest.raises(TaskRefused, match=f"delivered {MAX_DELIVERIES + 1} times"):
            tasks.generate_task.apply(args=["poison-1", payload], task_id=task_id).get()
    finally:
        redis.Redis.from_url(broker).delete(f"auditor:deliveries:{task_id}")
    assert ran == ["poison-1"] * MAX_DELIVERIES  # the refused delivery did not run
    with session_factory(engine)() as session:
        request = store.get_request(session, request_id="poison-1")
        assert request.status == "failed" and "not run again" in request.error
    engine.dispose()
