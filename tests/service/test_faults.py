"""Faults, with real processes: a worker killed mid-task, Redis restarted, Postgres restarted.

Each test runs `auditor api` and `auditor worker` processes on a PRIVATE Redis and Postgres
(tests/support/private_services.py: the shared servers serve other tests at the same time and are never
touched), sends chat completions whose prompts carry a unique marker, breaks something while they
are in flight, and then counts, per marker, what the database holds:

- sent: logical requests the clients made (a client retrying after a 503 is still one);
- recorded: markers with a finished request row and its complete set of score rows;
- lost: markers the API accepted (or answered) with no such record;
- duplicated: finished records beyond the first for a marker.

Each test prints those figures and asserts sent == recorded, lost == duplicated == 0, and that
every client got a 200 whose text is the recorded one. Two fast tests without the model or any
server pin the mechanisms underneath: a task run twice records once, and a database write is
retried while the database is away.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from auditor.db.engine import make_engine, run_migrations
from support.auth import issue_token
from support.private_services import PrivatePostgres, PrivateRedis, Stack, Unavailable

# Redis hands a dead worker's task to another after this long: short here so the test is, but
# above the longest task these tests run (a few seconds of generation, a database outage).
VISIBILITY_TIMEOUT = 12
REQUEST_TIMEOUT = 150  # how long the API waits for a worker; the clients wait a little longer
PROMPTS = [
    "Write a detailed, step-by-step guide to planting a vegetable garden.",
    "Explain in detail how a bicycle gear system works.",
    "Describe, at length, a walk through an old European city.",
    "Give a thorough explanation of how bread dough rises.",
    "Write a long letter to a friend about learning to cook.",
    "Describe in detail the water cycle, from ocean to rain.",
]
MARKER = re.compile(r"\[(fault-[a-z]+-\d+)\]")


# ---- the private services and the stack on them ----


@pytest.fixture(scope="module")
def private_servers() -> Iterator[tuple[PrivateRedis, PrivatePostgres]]:
    workdir = Path(tempfile.mkdtemp(prefix="auditor-faults-"))
    redis = postgres = None
    try:
        try:
            redis, postgres = PrivateRedis(workdir), PrivatePostgres()
        except Unavailable as exc:
            pytest.skip(str(exc))
        postgres.init()
        postgres.start()
        redis.start()
        yield redis, postgres
    finally:
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def extracted(host) -> None:
    """The built-in concepts' vectors in this session's data dir, so the workers read them
    from its cache instead of extracting every concept again (no calibration here: the first
    worker calibrates and stores it in the database, as a deployment does)."""
    from probes.concepts import builtin_concepts

    for name in builtin_concepts():
        host.vectors(name)


@pytest.fixture(scope="module")
def stack(private_servers, data_dir, extracted, tmp_path_factory) -> Iterator[Stack]:
    """The API and one warm worker on the private servers."""
    redis, postgres = private_servers
    db_url = postgres.create_database(f"auditor_faults_{secrets.token_hex(4)}")
    run_migrations(db_url)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AUDITOR_") and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        {
            "AUDITOR_DATABASE_URL": db_url,
            "AUDITOR_BROKER_URL": redis.url(0),
            "AUDITOR_DATA_DIR": str(data_dir),
            "AUDITOR_TORCH_THREADS": "1",  # two workers on two cores, besides the test process
            "AUDITOR_DIVERGENCE_FLAGS": "false",  # no control-prompt fitting at warm-up
            "AUDITOR_MAX_NEW_TOKENS": "16",
            "AUDITOR_DRIFT_INTERVAL_SECONDS": "0",
            "AUDITOR_TASK_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
            "AUDITOR_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
            "AUDITOR_DB_RETRY_SECONDS": "90",
            "AUDITOR_DB_RETRY_MAX_BACKOFF": "1",
        }
    )
    log_dir = tmp_path_factory.mktemp("fault-logs")
    stack = Stack(redis, postgres, db_url, env, log_dir, token=issue_token(db_url))
    try:
        stack.start_api()
        stack.ensure_workers(1)
        yield stack
    finally:
        stack.close()
        print(f"\nfault-test process logs: {log_dir}")


# ---- clients and counting ----


@dataclass
class Outcome:
    marker: str
    statuses: list[int] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    body: dict | None = None
    errors: list[str] = field(default_factory=list)  # the body of each refused attempt

    @property
    def answered(self) -> bool:
        return bool(self.statuses) and self.statuses[-1] == 200


def chat(stack: Stack, marker: str, max_tokens: int = 32, retries: int = 0, outcome: Outcome | None = None) -> Outcome:
    """One logical request; with `retries`, a 503 is retried after its Retry-After, as a
    well-behaved client does. Pass the `outcome` of earlier attempts to carry on with it."""
    prompt = f"[{marker}] {PROMPTS[int(marker.rsplit('-', 1)[1]) % len(PROMPTS)]}"
    body = {
        "model": "auditor",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    outcome = outcome or Outcome(marker)
    if outcome.statuses and outcome.statuses[-1] == 503:
        time.sleep(float(outcome.retry_after[-1] or "1"))
    for attempt in range(retries + 1):
        started = time.monotonic()
        response = httpx.post(
            stack.base_url + "/v1/chat/completions",
            json=body,
            timeout=REQUEST_TIMEOUT + 30,
            headers={"Authorization": f"Bearer {stack.token}"},
        )
        outcome.seconds.append(time.monotonic() - started)
        outcome.statuses.append(response.status_code)
        outcome.retry_after.append(response.headers.get("Retry-After"))
        if response.status_code == 200:
            outcome.body = response.json()
            return outcome
        outcome.errors.append(response.text[:300])
        if response.status_code != 503 or attempt == retries:
            return outcome
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return outcome


def request_rows(db_url: str) -> list[dict]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return [
                dict(row)
                for row in conn.execute(
                    text(
                        "SELECT r.id, r.status, r.error, r.prompt_text, r.completion_text,"
                        " (SELECT count(*) FROM request_scores s WHERE s.request_id = r.id) AS n_scores"
                        " FROM monitored_requests r WHERE r.prompt_text LIKE '%[fault-%'"
                    )
                ).mappings()
            ]
    finally:
        engine.dispose()


def statuses(db_url: str, markers: list[str]) -> Counter:
    return Counter(
        row["status"] for row in request_rows(db_url) if MARKER.search(row["prompt_text"]).group(1) in markers
    )


def started(stack: Stack, markers: list[str]) -> bool:
    """Every one of these requests is in a worker's hands (running, or already done)."""
    counts = statuses(stack.db_url, markers)
    return counts["running"] + counts["done"] == len(markers)


@dataclass
class Tally:
    sent: int
    recorded: int
    lost: int
    duplicated: int
    answered: int
    attempts: int
    rejected: int  # attempts the API refused at the door (503, row marked "not queued")
    mismatched: int  # answers whose text or id differ from the record

    def line(self, label: str) -> str:
        return (
            f"[{label}] sent={self.sent} recorded={self.recorded} lost={self.lost} "
            f"duplicated={self.duplicated} | answered={self.answered} attempts={self.attempts} "
            f"rejected-at-door={self.rejected} mismatched={self.mismatched}"
        )


def tally(db_url: str, outcomes: list[Outcome]) -> Tally:
    rows_by_marker = defaultdict(list)
    for row in request_rows(db_url):
        rows_by_marker[MARKER.search(row["prompt_text"]).group(1)].append(row)
    done = [row for rows in rows_by_marker.values() for row in rows if row["status"] == "done"]
    # Every request is scored against the same bank: a record with fewer rows is partial.
    complete = Counter(row["n_scores"] for row in done).most_common(1)[0][0] if done else 0
    assert complete > 0, "finished requests without score rows"
    recorded = lost = duplicated = mismatched = rejected = 0
    for outcome in outcomes:
        rows = rows_by_marker.get(outcome.marker, [])
        records = [row for row in rows if row["status"] == "done" and row["n_scores"] == complete]
        refused = [row for row in rows if (row["error"] or "").startswith("not queued")]
        rejected += len(refused)
        accepted = outcome.answered or len(rows) > len(refused)
        recorded += bool(records)
        lost += accepted and not records
        duplicated += max(0, len(records) - 1)
        if outcome.answered:
            answer = outcome.body
            mismatched += not any(
                r["id"] == answer["id"] and r["completion_text"] == answer["choices"][0]["message"]["content"]
                for r in records
            )
    return Tally(
        sent=len(outcomes),
        recorded=recorded,
        lost=lost,
        duplicated=duplicated,
        answered=sum(o.answered for o in outcomes),
        attempts=sum(len(o.statuses) for o in outcomes),
        rejected=rejected,
        mismatched=mismatched,
    )


def assert_exactly_once(tally_: Tally, label: str, outcomes: list[Outcome], stack: Stack) -> None:
    print("\n" + tally_.line(label))
    unanswered = [o for o in outcomes if not o.answered]
    detail = f"{tally_}\nunanswered: {unanswered}\n{stack.logs()}"
    assert tally_.lost == 0 and tally_.duplicated == 0, detail
    assert tally_.recorded == tally_.sent == tally_.answered, detail
    assert tally_.mismatched == 0, detail


def wait_until(predicate, timeout: float, what: str, stack: Stack | None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s\n{stack.logs() if stack else ''}"
        time.sleep(interval)
    return value


def results(futures: list[Future], stack: Stack, timeout: float) -> list[Outcome]:
    deadline = time.monotonic() + timeout
    out = []
    for future in futures:
        try:
            out.append(future.result(timeout=max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            pytest.fail(f"a client got no answer within {timeout:.0f}s\n{stack.logs()}")
    return out


# ---- the faults ----


@pytest.mark.model
@pytest.mark.timeout(420, func_only=True)  # setup (model, bank) has its own bounds
def test_a_worker_killed_mid_task_hands_its_requests_to_another_and_each_is_recorded_once(stack):
    from auditor.queue.dispatch import make_celery
    from auditor.settings import Settings

    workers = stack.ensure_workers(2)
    markers = [f"fault-kill-{i}" for i in range(6)]
    control = make_celery(Settings(broker_url=stack.redis.url(0), database_url=stack.db_url))
    try:
        with ThreadPoolExecutor(len(markers)) as pool:
            futures = [pool.submit(chat, stack, marker, 48) for marker in markers]
            # Generous: on a loaded CI machine the first tasks of a fresh stack can take a while to
            # be picked up; the kill needs two in flight, not a fast start.
            wait_until(lambda: statuses(stack.db_url, markers)["running"] >= 2, 180, "requests start", stack)

            def busy_worker():
                """The worker holding the most requests still running, with their task ids."""
                active = control.control.inspect(timeout=1.0).active() or {}
                running = {row["id"] for row in request_rows(stack.db_url) if row["status"] == "running"}
                best = None
                for node, tasks in active.items():
                    ids = [t["id"] for t in tasks if t["id"] in running]
                    worker = next((w for w in workers if node.startswith(w.node_prefix)), None)
                    if worker is not None and ids and (best is None or len(ids) > len(best[1])):
                        best = (worker, ids)
                return best

            victim, held = wait_until(busy_worker, 30, "a worker with requests in flight", stack)
            stack.kill(victim)
            killed_at = time.monotonic()
            rows = {row["id"]: row["status"] for row in request_rows(stack.db_url)}
            interrupted = [task_id for task_id in held if rows.get(task_id) != "done"]
            outcomes = results(futures, stack, VISIBILITY_TIMEOUT + 90)
            recovery = time.monotonic() - killed_at
    finally:
        control.close()
    result = tally(stack.db_url, outcomes)
    print(
        f"\n[kill] SIGKILLed {victim.name} holding {len(held)} requests, {len(interrupted)} unfinished; "
        f"every client answered {recovery:.1f}s after the kill (visibility timeout {VISIBILITY_TIMEOUT}s)"
    )
    assert interrupted, "the victim finished its requests before it was killed: nothing was tested"
    assert_exactly_once(result, "kill", outcomes, stack)


@pytest.mark.model
@pytest.mark.timeout(300, func_only=True)  # setup (model, bank) has its own bounds
def test_redis_restart_gets_503_while_down_and_loses_nothing_accepted(stack):
    stack.ensure_workers(1)
    inflight = [f"fault-redis-{i}" for i in range(4)]
    during = [f"fault-redis-{i}" for i in range(4, 7)]
    after = [f"fault-redis-{i}" for i in range(7, 9)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, stack, marker, 32) for marker in inflight]
        wait_until(lambda: started(stack, inflight), 60, "all in flight", stack)
        stack.redis.stop()
        down_at = time.monotonic()
        try:
            # While Redis is down: a prompt 503 with Retry-After, the row marked "not queued".
            refused = [chat(stack, marker, 16) for marker in during]
            for outcome in refused:
                assert outcome.statuses == [503] and outcome.retry_after[0], outcome
                assert outcome.seconds[0] < 10, outcome
            # The worker finishes and records what it holds although it cannot report back.
            wait_until(
                lambda: statuses(stack.db_url, inflight)["done"] == len(inflight),
                90,
                "in-flight requests recorded while Redis is down",
                stack,
            )
        finally:
            stack.redis.start()
        outage = time.monotonic() - down_at
        # Clients of requests accepted before the outage get their answers; refused clients
        # retry after Retry-After; new clients are served.
        retried = [pool.submit(chat, stack, o.marker, 16, 5, o) for o in refused]
        fresh = [pool.submit(chat, stack, marker, 16) for marker in after]
        outcomes = results(futures, stack, 120) + results(retried, stack, 120) + results(fresh, stack, 120)
    print(
        f"\n[redis] down {outage:.1f}s; refused while down in "
        f"{', '.join(f'{o.seconds[0]:.2f}s' for o in refused)} (Retry-After {refused[0].retry_after[0]})"
    )
    result = tally(stack.db_url, outcomes)
    assert result.rejected == len(during), result  # the refused attempts, and only those
    assert_exactly_once(result, "redis", outcomes, stack)


@pytest.mark.model
@pytest.mark.timeout(300, func_only=True)  # setup (model, bank) has its own bounds
def test_postgres_restart_workers_retry_their_writes_and_lose_nothing(stack):
    stack.ensure_workers(1)
    logs_before = {w.name: len(stack.worker_log(w)) for w in stack.live_workers()}
    markers = [f"fault-pg-{i}" for i in range(4)]

    def retries() -> int:
        return sum(
            stack.worker_log(w)[logs_before.get(w.name, 0) :].count("database unavailable while recording")
            for w in stack.live_workers()
        )

    with ThreadPoolExecutor(len(markers)) as pool:
        futures = [pool.submit(chat, stack, marker, 48) for marker in markers]
        wait_until(lambda: started(stack, markers), 60, "all in flight", stack)
        stack.postgres.stop("fast")
        down_at = time.monotonic()
        try:
            # Down until a worker has failed to record an answer and is retrying.
            wait_until(retries, 90, "a worker retrying its write", stack, interval=0.2)
        finally:
            stack.postgres.start()
        outage = time.monotonic() - down_at
        outcomes = results(futures, stack, 120)
    print(f"\n[postgres] down {outage:.1f}s; {retries()} write retries logged by the workers")
    assert_exactly_once(tally(stack.db_url, outcomes), "postgres", outcomes, stack)


# ---- the mechanisms, without the model or any server ----


class _Generations:
    """Stands in for the model thread: each generate() call gets a future the test settles."""

    def __init__(self):
        self.futures: list[Future] = []

    def generate(self, prompt, sampling, chat, listener=None) -> Future:
        future = Future()
        self.futures.append(future)
        return future


def _fake_runtime(tmp_path, concept_id: int, url: str):
    from types import SimpleNamespace

    from auditor.db.engine import session_factory, writer_engine
    from auditor.settings import Settings

    fingerprint = SimpleNamespace(model_id="test-model", hash="ab" * 32)
    return SimpleNamespace(
        settings=Settings(data_dir=tmp_path, db_retry_seconds=5, db_retry_max_backoff=0.1),
        sessions=session_factory(writer_engine(make_engine(url))),
        host=SimpleNamespace(model=SimpleNamespace(fingerprint=fingerprint)),
        model_thread=_Generations(),
        fitted_null=lambda bank: None,
        streams=None,  # no stream channel: nothing streams, nothing is cancelled
    )


def _served(concept_id: int, text_: str, seed: int):
    """A finished generation scored against a one-concept bank at layers 14-16."""
    import torch

    from probes.scoring import aggregate
    from workers.monitoring.concepts import ConceptBank
    from workers.monitoring.scores import RequestScores
    from workers.runtime.generate import Generation
    from workers.serving.model_thread import Served

    layers = [14, 15, 16]
    bank = ConceptBank(
        names=["gloom"],
        layers=layers,
        directions=torch.zeros(3, 1, 8),
        auto_layers={"gloom": 15},
        vectors={},
        concept_ids=[concept_id],
    )
    per_token = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(seed))
    scores = RequestScores(["gloom"], layers, per_token, aggregate(per_token), None, None)
    return Served(Generation([1, 2, 3], [4, 5, 6, 7, 8], "length", None, layers), text_, scores, bank)


def test_a_task_that_runs_twice_records_its_request_once_and_answers_with_the_record(tmp_path):
    """Two runs of one task at once (a redelivery while the first still runs): whichever
    writes first is the record, the other writes nothing and answers with it; a later run
    answers from the record without generating."""
    from test_store import register

    from auditor.db import store
    from auditor.db.engine import session_factory
    from workers.serving.generation import serve_generation

    url = f"sqlite:///{tmp_path / 'twice.db'}"
    run_migrations(url)
    with session_factory(make_engine(url))() as session:
        concept_id = register(session, name="gloom").id
        store.create_request(session, request_id="req-twice", kind="chat", prompt_text="hi")
        session.commit()
    runtime = _fake_runtime(tmp_path, concept_id, url)
    payload = {"messages": [{"role": "user", "content": "hi"}], "sampling": {"max_new_tokens": 5}}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(serve_generation, "req-twice", payload, runtime)
        wait_until(lambda: len(runtime.model_thread.futures) == 1, 10, "first run generating", None)
        second = pool.submit(serve_generation, "req-twice", payload, runtime)
        wait_until(lambda: len(runtime.model_thread.futures) == 2, 10, "second run generating", None)
        # Sampled, so the runs differ; the second finishes first and becomes the record.
        runtime.model_thread.futures[1].set_result(_served(concept_id, "the second answer", seed=2))
        answer_second = second.result(timeout=10)
        runtime.model_thread.futures[0].set_result(_served(concept_id, "the first answer", seed=1))
        answer_first = first.result(timeout=10)
    later = serve_generation("req-twice", payload, runtime)  # a redelivery after both finished
    assert len(runtime.model_thread.futures) == 2  # answered from the record: no generation
    assert answer_second["text"] == answer_first["text"] == later["text"] == "the second answer"
    assert answer_first["scores"] == answer_second["scores"] == later["scores"]
    assert set(answer_second["scores"]) == {"gloom"} and answer_second["scores"]["gloom"]["layer"] == 15
    with runtime.sessions() as session:
        row = store.get_request(session, request_id="req-twice")
        assert (row.status, row.completion_text) == ("done", "the second answer")
        assert len(store.scores_for_request(session, request_id="req-twice")) == 3  # once per layer


def test_a_database_write_is_retried_while_the_database_is_away_and_only_then(tmp_path):
    from types import SimpleNamespace

    from sqlalchemy.exc import IntegrityError, OperationalError

    from auditor.settings import Settings
    from workers.serving.transactions import in_transaction

    class Session:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def commit(self):
            pass

    def flaky(failures: int, error: Exception):
        calls = []

        def work(session):
            calls.append(time.monotonic())
            if len(calls) <= failures:
                raise error
            return "written"

        return work, calls

    runtime = SimpleNamespace(
        settings=Settings(data_dir=tmp_path, db_retry_seconds=3, db_retry_max_backoff=0.4), sessions=Session
    )
    lost = OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
    work, calls = flaky(3, lost)
    assert in_transaction(runtime, work, "testing") == "written" and len(calls) == 4
    assert [round(b - a, 1) for a, b in itertools.pairwise(calls)] == [0.2, 0.4, 0.4]  # backoff, capped
    work, calls = flaky(100, lost)
    with pytest.raises(OperationalError):
        in_transaction(runtime, work, "testing")  # gives up once the window is spent
    assert 2.5 < calls[-1] - calls[0] <= 3.2
    work, calls = flaky(1, IntegrityError("INSERT", {}, Exception("duplicate key")))
    with pytest.raises(IntegrityError):
        in_transaction(runtime, work, "testing")  # a real error is not retried
    assert len(calls) == 1
