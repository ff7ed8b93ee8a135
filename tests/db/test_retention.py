"""Retention on real Postgres and SQLite: seeded traffic over 40 days, retention at 30. Exactly the
old requests go (with their scores, traces and flags); the daily rollups equal the statistics of
what was deleted; reports over the retained window are unchanged and the daily series reads the
rollups for older days; concurrent runs count every request once. Then a real `auditor beat` and
a real Celery worker run the scheduled task against Redis. No model is loaded."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select

from auditor.db import store
from auditor.db.engine import make_engine, run_migrations, session_factory, writer_engine
from auditor.db.models import FLAG_KINDS, DailyRollup, Flag, Job, MonitoredRequest, RequestScore
from auditor.db.retention import RetentionLoop, cutoff_for, run_retention
from auditor.reports import build_report
from auditor.reports.queries import resolve_concepts
from auditor.reports.render import to_json
from auditor.reports.report import series_section
from auditor.reports.window import Window
from auditor.settings import Settings
from support.databases import Databases, _postgres_reachable

UTC = UTC
NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
DAYS = 30
CUTOFF = NOW - timedelta(days=DAYS)
MODELS = ("org/model-a", "org/model-b", None)  # None: a request whose serving model was never recorded
D_MODEL, N_LAYERS = 8, 30
# name -> (primary layer, layers with a vector)
CONCEPTS = {"pessimism": (15, (14, 15)), "formality": (3, (3,))}


@dataclass
class Seeded:
    url: str
    concept_ids: dict[str, int] = field(default_factory=dict)
    requests: dict[str, dict] = field(default_factory=dict)  # id -> created_at, model, scores, flags
    jobs: dict[str, tuple[datetime, str]] = field(default_factory=dict)  # id -> created_at, status

    def ids(self, old: bool) -> set[str]:
        return {rid for rid, r in self.requests.items() if (r["created_at"] < CUTOFF) == old}

    def expected_rollups(self) -> dict[tuple[date, str, int], dict]:
        """The rollup rows retention must write, computed from the seed alone."""
        groups: dict[tuple[date, str, int], dict] = defaultdict(
            lambda: {"scores": [], "z": [], "flagged": set(), **{k: set() for k in FLAG_KINDS}}
        )
        for rid in self.ids(old=True):
            r = self.requests[rid]
            for name, concept_id in self.concept_ids.items():
                key = (r["created_at"].date(), r["model"] or "", concept_id)
                if name in r["scores"]:
                    score, z = r["scores"][name]
                    groups[key]["scores"].append(score)
                    if z is not None:
                        groups[key]["z"].append(z)
                for kind in {kind for concept, kind in r["flags"] if concept == name}:
                    groups[key]["flagged"].add(rid)
                    groups[key][kind].add(rid)
        expected = {}
        for key, g in groups.items():
            scores, zs = np.array(g["scores"]), np.array(g["z"])
            expected[key] = {
                "requests": scores.size, "score_sum": scores.sum(), "score_sumsq": (scores**2).sum(),
                "score_min": scores.min() if scores.size else None, "score_max": scores.max() if scores.size else None,
                "z_count": zs.size, "z_sum": zs.sum(), "z_sumsq": (zs**2).sum(),
                "z_min": zs.min() if zs.size else None, "z_max": zs.max() if zs.size else None,
                "flagged": len(g["flagged"]), **{f"flagged_{k}": len(g[k]) for k in FLAG_KINDS},
            }  # fmt: skip
        return expected


def _seed(url: str) -> Seeded:
    """A request every ~7 hours for 40 days; each scored for both concepts at every layer with a
    vector (off the primary layer an absurd value no rollup may read), some without a z, some
    flagged (at the primary layer or not, twice with different kinds, or twice with the same
    kind); some failed without scores; a few carry traces. Plus old and new jobs."""
    seeded, rng = Seeded(url), np.random.default_rng(5)
    engine = make_engine(url)
    with session_factory(engine)() as session:
        for name, (primary, layers) in CONCEPTS.items():
            concept = store.add_concept_version(
                session, name=name, vectors={layer: rng.normal(size=D_MODEL) for layer in layers},
                primary_layer=primary, created_by="test", model_id="org/model-a", model_fingerprint="aa" * 32,
                loader="test", hook_point="blocks.{layer}.hook_resid_post", d_model=D_MODEL,
                n_layers_model=N_LAYERS, method="mean_diff", pooling="mean", source="pairs",
            )  # fmt: skip
            seeded.concept_ids[name] = concept.id
        for i in range(140):
            created_at = NOW - timedelta(days=40) + timedelta(hours=6.9 * i, minutes=int(rng.integers(0, 50)))
            rid, model = f"req-{i:03d}", MODELS[i % 3]
            store.create_request(
                session,
                request_id=rid,
                kind="chat",
                prompt_text=f"prompt {i}",
                model_id=model,
                created_at=created_at,
                privacy_mode=("full", "redacted", "hash")[i % 3],
            )
            record = {"created_at": created_at, "model": model, "scores": {}, "flags": []}
            seeded.requests[rid] = record
            if i % 11 == 5:  # failed before it was scored
                store.mark_request(session, request_id=rid, status="failed", error="boom")
                continue
            store.mark_request(session, request_id=rid, status="running")
            store.mark_request(session, request_id=rid, status="done", completion_text=f"answer {i}")
            rows = []
            for name, (primary, layers) in CONCEPTS.items():
                if name == "formality" and i % 7 == 0:
                    continue  # not every request is scored for every concept
                score = float(rng.normal(0.05, 0.02))
                z = None if i % 9 == 0 else float(rng.normal())
                record["scores"][name] = (score, z)
                for layer in layers:
                    value = score if layer == primary else 5.0
                    rows.append(
                        {
                            "concept_id": seeded.concept_ids[name],
                            "layer": layer,
                            "mean": value,
                            "max": value,
                            "last": value,
                            "answer_z": z if layer == primary else None,
                            "calibrated_z": 99.0,
                            "percentile": None,
                            "n_tokens": 4,
                            "trace": [value] * 4 if i % 5 == 0 else None,
                        }
                    )
            store.insert_scores(session, request_id=rid, rows=rows)
            for name, kind, layer in _flags_for(i):
                store.add_flag(
                    session,
                    request_id=rid,
                    concept_id=seeded.concept_ids[name],
                    layer=layer,
                    kind=kind,
                    residual_signal=1.0,
                    threshold=0.5,
                    reason="seeded",
                )
                record["flags"].append((name, kind))
        for created_at, status in (
            (NOW - timedelta(days=35), "done"),  # old, done
            (NOW - timedelta(days=35), "running"),  # old, still running
            (NOW - timedelta(days=2), "done"),  # new, done
        ):
            job = store.create_job(session, kind="calibrate", payload={"target_fpr": 0.01})
            job.created_at, job.status = created_at, status
            seeded.jobs[job.id] = (created_at, status)
        session.commit()
    engine.dispose()
    return seeded


def _flags_for(i: int) -> list[tuple[str, str, int]]:
    flags = []
    if i % 4 == 0:
        flags.append(("pessimism", "hidden", 15))
    if i % 6 == 0:
        flags.append(("pessimism", "surface", 14))  # off the primary layer: still the concept's flag
    if i % 12 == 0:
        flags.append(("pessimism", "surface", 15))  # the same kind twice: one flagged request
    if i % 5 == 0 and i % 7:
        flags.append(("formality", "threshold", 3))
    return flags


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def databases(request, tmp_path_factory) -> Iterator[Databases]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    dbs = Databases(request.param, tmp_path_factory.mktemp(f"retention-{request.param}"))
    yield dbs
    dbs.drop_all()


@pytest.fixture
def seeded(databases) -> Seeded:
    url = databases.new_url()
    run_migrations(url)
    return _seed(url)


@pytest.fixture
def sessions(seeded):
    engine = make_engine(seeded.url)
    yield session_factory(writer_engine(engine))
    engine.dispose()


def _rollups(sessions) -> dict[tuple[date, str, int], dict]:
    with sessions() as session:
        rows = session.scalars(select(DailyRollup)).all()
    columns = [
        c.name for c in DailyRollup.__table__.columns if c.name not in ("day", "model_id", "concept_id", "layer")
    ]
    return {(r.day, r.model_id, r.concept_id): {c: getattr(r, c) for c in columns} for r in rows}


def _assert_rollups_match(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, want in expected.items():
        got = actual[key]
        for column, value in want.items():
            if value is None or isinstance(value, int):
                assert got[column] == value, (key, column)
            else:
                assert got[column] == pytest.approx(float(value), rel=1e-12, abs=1e-15), (key, column)


def _request_ids(sessions) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(MonitoredRequest.id)))


def _count(sessions, model, request_ids) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.request_id.in_(list(request_ids))))


def _recent_report(sessions) -> dict:
    """The whole report over the last 10 days against the 19 before: inside the retained window."""
    with sessions() as session:
        built = build_report(
            session,
            NOW - timedelta(days=10),
            NOW,
            CUTOFF + timedelta(days=1),
            NOW - timedelta(days=10),
            top=1000,
            bucket="day",
        )
    document = json.loads(to_json(built))
    document.pop("generated_at")
    return document


def _daily_series(sessions, window: Window) -> dict[tuple[str, datetime], tuple]:
    with sessions() as session:
        refs = resolve_concepts(session, names=None, windows=[window])
        points = series_section(session, refs=refs, window=window, bucket="day")
    return {(p.concept, p.bucket_start): (p.requests, p.flagged, p.mean_score, p.mean_z) for p in points}


def test_retention_folds_and_deletes_exactly_the_old_requests(seeded, sessions):
    old, new = seeded.ids(old=True), seeded.ids(old=False)
    assert len(old) > 30 and len(new) > 90  # both sides of the cutoff are populated
    new_scores, new_flags = _count(sessions, RequestScore, new), _count(sessions, Flag, new)
    report_before = _recent_report(sessions)

    result = run_retention(sessions, cutoff=CUTOFF, batch_size=7)  # several batches, one left short

    assert _request_ids(sessions) == new
    assert _count(sessions, RequestScore, old) == 0 and _count(sessions, Flag, old) == 0
    assert (_count(sessions, RequestScore, new), _count(sessions, Flag, new)) == (new_scores, new_flags)
    assert result.requests == len(old) and result.batches == -(-len(old) // 7)
    # Two score rows per request for pessimism (layers 14 and 15), one for formality.
    assert result.scores == sum(
        2 * ("pessimism" in seeded.requests[r]["scores"]) + ("formality" in seeded.requests[r]["scores"]) for r in old
    )
    assert result.flags == sum(len(seeded.requests[r]["flags"]) for r in old)
    _assert_rollups_match(_rollups(sessions), seeded.expected_rollups())
    # Finished jobs past the window go; a running one and recent ones stay.
    with sessions() as session:
        jobs = {job.id: job.status for job in session.scalars(select(Job))}
    assert set(jobs) == {jid for jid, (at, status) in seeded.jobs.items() if at >= CUTOFF or status == "running"}
    assert result.jobs == 1
    # Reports over the retained window: identical.
    assert _recent_report(sessions) == report_before

    # Idempotent: a second run finds nothing and adds nothing.
    rollups = _rollups(sessions)
    again = run_retention(sessions, cutoff=CUTOFF, batch_size=7)
    assert (again.requests, again.rollups, again.jobs) == (0, 0, 0)
    assert _rollups(sessions) == rollups


def test_the_daily_series_reads_the_rollups_past_retention(seeded, sessions):
    # From a midnight: a rolled-up day that starts before the window is left out (it would bring
    # requests from before the window), so a window starting mid-day would lose its first day.
    window = Window(datetime.combine((NOW - timedelta(days=39)).date(), datetime.min.time(), tzinfo=UTC), NOW)
    before = _daily_series(sessions, window)
    run_retention(sessions, cutoff=CUTOFF, batch_size=50)
    after = _daily_series(sessions, window)
    assert set(after) == set(before)
    for key, (n, flagged, mean_score, mean_z) in before.items():
        got = after[key]
        assert got[:2] == (n, flagged), key
        assert got[2] == pytest.approx(mean_score, rel=1e-12)
        assert got[3] == pytest.approx(mean_z, rel=1e-9, abs=1e-12) if mean_z is not None else got[3] is None
    # The cutoff's own day is both rolled up (before noon) and raw (after): one point, all of it.
    cutoff_day = datetime.combine(CUTOFF.date(), datetime.min.time(), tzinfo=UTC)
    assert ("pessimism", cutoff_day) in after
    # Hourly buckets cannot be cut out of a day: past retention they are simply empty.
    with sessions() as session:
        refs = resolve_concepts(session, names=None, windows=[window])
        hourly = series_section(session, refs=refs, window=window, bucket="hour")
    assert hourly and min(p.bucket_start for p in hourly) >= CUTOFF - timedelta(hours=1)


def test_concurrent_runs_count_every_request_once(seeded, sessions):
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_retention(sessions, cutoff=CUTOFF, batch_size=3)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert _request_ids(sessions) == seeded.ids(old=False)
    _assert_rollups_match(_rollups(sessions), seeded.expected_rollups())


def test_retention_off_keeps_everything(seeded, sessions):
    assert cutoff_for(0, NOW) is None
    result = run_retention(sessions, cutoff=cutoff_for(0, NOW))
    assert result.requests == 0 and _request_ids(sessions) == set(seeded.requests)


def _days_to_cutoff() -> float:
    """retention_days that put the cutoff (relative to the real clock) at the seed's CUTOFF."""
    return (datetime.now(UTC) - CUTOFF).total_seconds() / 86400


def test_the_embedded_loop_runs_retention_in_the_background(seeded, sessions):
    days = _days_to_cutoff()
    loop = RetentionLoop(
        Settings(database_url=seeded.url, retention_days=days, retention_interval_seconds=0.2), sessions
    )
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while loop.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert loop.runs >= 2
    # The loop's cutoff moved with the clock since it started: a few requests just after the
    # test's cutoff may have gone too, never one from the last 29 days.
    remaining = _request_ids(sessions)
    assert not remaining & seeded.ids(old=True)
    assert {
        rid for rid in seeded.ids(old=False) if seeded.requests[rid]["created_at"] > CUTOFF + timedelta(days=1)
    } <= remaining


# ---- Celery beat and a real worker ----


def _redis_db() -> int | None:
    """A Redis database no one else is using (the service tests pick theirs at random too)."""
    try:
        import redis

        for db in random.sample(range(1, 16), 15):
            client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_connect_timeout=2)
            if client.dbsize() == 0:
                return db
    except Exception:
        return None
    return None


def _stop(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


@pytest.fixture
def service_seeded(tmp_path) -> Iterator[Seeded]:
    """The same seed, once, on Postgres (the production path) or SQLite when it is away."""
    dbs = Databases("postgres" if _postgres_reachable() is None else "sqlite", tmp_path)
    url = dbs.new_url()
    run_migrations(url)
    yield _seed(url)
    dbs.drop_all()


def test_celery_beat_sends_retention_to_a_real_worker(service_seeded, tmp_path):
    """`auditor beat` and a Celery worker (threads pool, no model warm-up: AUDITOR_WORKER_POOL
    unset) on a private Redis database; beat's interval is one second. The old requests must go
    within the minute."""
    seeded = service_seeded
    redis_db = _redis_db()
    if redis_db is None:
        pytest.skip("no free Redis database at 127.0.0.1:6379")
    import redis

    broker = f"redis://127.0.0.1:6379/{redis_db}"
    env = {
        **os.environ,
        "AUDITOR_DATABASE_URL": seeded.url,
        "AUDITOR_BROKER_URL": broker,
        "AUDITOR_DATA_DIR": str(tmp_path),
        "AUDITOR_RETENTION_DAYS": f"{_days_to_cutoff():.6f}",
        "AUDITOR_RETENTION_INTERVAL_SECONDS": "1",
        "AUDITOR_WORKER_METRICS_PORT": "0",
    }
    env.pop("AUDITOR_WORKER_POOL", None)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.tasks",
            "worker",
            "--pool=threads",
            "--concurrency=2",
            "--loglevel=INFO",
            f"--hostname=retention-{os.getpid()}@%h",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    beat = subprocess.Popen(
        [sys.executable, "-m", "auditor.cli", "beat"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    engine = make_engine(seeded.url)
    sessions = session_factory(engine)
    try:
        deadline = time.monotonic() + 55
        while _request_ids(sessions) & seeded.ids(old=True):
            assert worker.poll() is None and beat.poll() is None, "worker or beat exited"
            assert time.monotonic() < deadline, "no retention run within 55 s"
            time.sleep(0.5)
        remaining = _request_ids(sessions)
        rollups = _rollups(sessions)
    finally:
        worker_log, beat_log = _stop(worker), _stop(beat)
        engine.dispose()
        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
    assert "Sending due task retention (auditor.retention)" in beat_log, beat_log
    assert "auditor.retention" in worker_log and "succeeded" in worker_log, worker_log
    assert remaining == seeded.ids(old=False)
    _assert_rollups_match(rollups, seeded.expected_rollups())
