"""Retention: requests older than the window become daily rollups, then go.

A run takes the oldest requests created before the cutoff, `batch_size` at a time, and in one
transaction per batch folds their primary-layer scores and their flags into `daily_rollups`
(additive upserts: see models.DailyRollup), then deletes their flags, their score rows (traces
included) and the requests themselves. A batch is all or nothing, so a run that dies half-way
leaves nothing counted twice, and the next run carries on where it stopped (idempotent).

Concurrent runs (two beats by mistake, the embedded thread beside a worker) are safe: on
Postgres each batch claims its requests with FOR UPDATE SKIP LOCKED, so no request is folded
twice, and the upserts add under the rollup row's lock, taken in key order, so two runs never
deadlock; SQLite admits one writer at a time (the caller's session begins IMMEDIATE).

Finished jobs older than the window go too. Concepts, vectors, calibrations and the admin log
are kept: they are the registry, not traffic.

Size: one batch transaction (claim, fold, delete) whose steps must be read together to see it is
all-or-nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, select
from sqlalchemy.orm import Session

from auditor.db.enums import JobStatus
from auditor.db.models import FLAG_KINDS, Concept, DailyRollup, Flag, Job, MonitoredRequest, RequestScore, utcnow
from auditor.errors import AuditorError
from auditor.settings import Settings

log = logging.getLogger(__name__)

ROLLUP_KEY = ("day", "model_id", "concept_id")
_ADDITIVE = ("requests", "score_sum", "score_sumsq", "z_count", "z_sum", "z_sumsq", "flagged",
             *(f"flagged_{kind}" for kind in FLAG_KINDS))  # fmt: skip


@dataclass
class RetentionResult:
    cutoff: datetime | None
    requests: int = 0  # deleted
    scores: int = 0  # score rows deleted (each with its trace)
    flags: int = 0
    jobs: int = 0
    rollups: int = 0  # rollup rows written or added to (one per day, model and concept per batch)
    batches: int = 0

    def add(self, other: RetentionResult) -> None:
        for name in ("requests", "scores", "flags", "jobs", "rollups", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = None if self.cutoff is None else self.cutoff.isoformat()
        return data


def cutoff_for(days: float, now: datetime | None = None) -> datetime | None:
    """Rows created before this instant are past retention; None = keep forever."""
    if days <= 0:
        return None
    return (now or utcnow()) - timedelta(days=days)


@dataclass
class _Fold:
    """One rollup row in the making."""

    layer: int
    requests: int = 0
    score_sum: float = 0.0
    score_sumsq: float = 0.0
    score_min: float | None = None
    score_max: float | None = None
    z_count: int = 0
    z_sum: float = 0.0
    z_sumsq: float = 0.0
    z_min: float | None = None
    z_max: float | None = None
    flagged_ids: set[str] = field(default_factory=set)
    by_kind: dict[str, set[str]] = field(default_factory=dict)

    def add_score(self, score: float, z: float | None) -> None:
        self.requests += 1
        self.score_sum += score
        self.score_sumsq += score * score
        self.score_min = score if self.score_min is None else min(self.score_min, score)
        self.score_max = score if self.score_max is None else max(self.score_max, score)
        if z is not None:
            self.z_count += 1
            self.z_sum += z
            self.z_sumsq += z * z
            self.z_min = z if self.z_min is None else min(self.z_min, z)
            self.z_max = z if self.z_max is None else max(self.z_max, z)

    def row(self, key: tuple[date, str, int]) -> dict[str, Any]:
        day, model_id, concept_id = key
        return {
            "day": day, "model_id": model_id, "concept_id": concept_id, "layer": self.layer,
            "requests": self.requests, "score_sum": self.score_sum, "score_sumsq": self.score_sumsq,
            "score_min": self.score_min, "score_max": self.score_max, "z_count": self.z_count,
            "z_sum": self.z_sum, "z_sumsq": self.z_sumsq, "z_min": self.z_min, "z_max": self.z_max,
            "flagged": len(self.flagged_ids),
            **{f"flagged_{kind}": len(self.by_kind.get(kind, ())) for kind in FLAG_KINDS},
        }  # fmt: skip


def utc_day(instant: datetime) -> date:
    return instant.astimezone(UTC).date()


def fold(session: Session, *, request_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rollup rows of these requests: their scores at each concept version's primary layer
    (what reports read) and their flags, per UTC day of the request, serving model and concept.
    Sorted by key, the order the upsert locks them in."""
    folds: dict[tuple[date, str, int], _Fold] = {}
    at_primary = and_(Concept.id == RequestScore.concept_id, Concept.primary_layer == RequestScore.layer)
    scores = session.execute(
        select(MonitoredRequest.created_at, MonitoredRequest.model_id, RequestScore.concept_id,
               RequestScore.layer, RequestScore.mean, RequestScore.answer_z)
        .join(MonitoredRequest, MonitoredRequest.id == RequestScore.request_id)
        .join(Concept, at_primary)
        .where(RequestScore.request_id.in_(request_ids))
    )  # fmt: skip
    for created_at, model_id, concept_id, layer, score, z in scores:
        key = (utc_day(created_at), model_id or "", concept_id)
        folds.setdefault(key, _Fold(layer)).add_score(score, z)
    flags = session.execute(
        select(MonitoredRequest.created_at, MonitoredRequest.model_id, Flag.concept_id, Concept.primary_layer,
               Flag.request_id, Flag.kind)
        .join(MonitoredRequest, MonitoredRequest.id == Flag.request_id)
        .join(Concept, Concept.id == Flag.concept_id)
        .where(Flag.request_id.in_(request_ids))
        .distinct()
    )  # fmt: skip
    for created_at, model_id, concept_id, layer, request_id, kind in flags:
        entry = folds.setdefault((utc_day(created_at), model_id or "", concept_id), _Fold(layer))
        entry.flagged_ids.add(request_id)
        entry.by_kind.setdefault(kind, set()).add(request_id)
    return [folds[key].row(key) for key in sorted(folds)]


def _least(current, new):
    """min() that ignores NULL on either side, the same on Postgres and SQLite."""
    return case((new.is_(None), current), (current.is_(None), new), (current <= new, current), else_=new)


def _greatest(current, new):
    return case((new.is_(None), current), (current.is_(None), new), (current >= new, current), else_=new)


def upsert_rollups(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Add `rows` to the rollups: counts and sums add up, minima and maxima combine."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the two supported backends
        raise AuditorError(f"retention does not support the {dialect} backend")
    table = DailyRollup.__table__
    statement = insert(table)
    new, current = statement.excluded, table.c
    merged = {name: current[name] + new[name] for name in _ADDITIVE}
    for name in ("score_min", "z_min"):
        merged[name] = _least(current[name], new[name])
    for name in ("score_max", "z_max"):
        merged[name] = _greatest(current[name], new[name])
    session.execute(statement.on_conflict_do_update(index_elements=list(ROLLUP_KEY), set_=merged), list(rows))
    return len(rows)


def retain_batch(session: Session, *, cutoff: datetime, batch_size: int) -> RetentionResult:
    """Fold and delete up to `batch_size` of the oldest requests created before `cutoff`. The
    caller commits (or rolls back: then nothing happened)."""
    result = RetentionResult(cutoff)
    claim = (
        select(MonitoredRequest.id)
        .where(MonitoredRequest.created_at < cutoff)
        .order_by(MonitoredRequest.created_at, MonitoredRequest.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)  # Postgres: concurrent runs take disjoint batches
    )
    request_ids = list(session.scalars(claim))
    if not request_ids:
        return result
    result.rollups = upsert_rollups(session, fold(session, request_ids=request_ids))
    scores, flags, requests = RequestScore.__table__, Flag.__table__, MonitoredRequest.__table__
    result.flags = session.execute(delete(flags).where(flags.c.request_id.in_(request_ids))).rowcount
    result.scores = session.execute(delete(scores).where(scores.c.request_id.in_(request_ids))).rowcount
    result.requests = session.execute(delete(requests).where(requests.c.id.in_(request_ids))).rowcount
    result.batches = 1
    return result


def delete_old_jobs(session: Session, *, cutoff: datetime) -> int:
    """Finished extraction and calibration jobs created before `cutoff` (their results live on
    in the concepts and calibrations they produced)."""
    jobs = Job.__table__
    finished = and_(jobs.c.created_at < cutoff, jobs.c.status.in_((JobStatus.DONE, JobStatus.FAILED)))
    return session.execute(delete(jobs).where(finished)).rowcount


def run_retention(
    sessions: Callable[[], Session],
    *,
    cutoff: datetime | None,
    batch_size: int = 500,
    max_batches: int | None = None,
) -> RetentionResult:
    """Batches until nothing before `cutoff` is left (or `max_batches`), one transaction each.
    `sessions` should begin IMMEDIATE on SQLite (auditor.db.engine.writer_engine)."""
    total = RetentionResult(cutoff)
    if cutoff is None:
        return total
    while max_batches is None or total.batches < max_batches:
        with sessions() as session:
            batch = retain_batch(session, cutoff=cutoff, batch_size=batch_size)
            session.commit()
        total.add(batch)
        if batch.requests < batch_size:
            break
    with sessions() as session:
        total.jobs = delete_old_jobs(session, cutoff=cutoff)
        session.commit()
    if total.requests or total.jobs:
        log.info(
            "retention: %d requests (%d score rows, %d flags) and %d jobs created before %s "
            "folded into %d rollup rows and deleted",
            total.requests,
            total.scores,
            total.flags,
            total.jobs,
            cutoff.isoformat(),
            total.rollups,
        )
    return total


def run_from_settings(settings: Settings, now: datetime | None = None) -> RetentionResult:
    """One retention run against the configured database (what the Celery task does)."""
    from auditor.db.engine import database_url, make_engine, session_factory, writer_engine

    engine = make_engine(database_url(settings))
    try:
        return run_retention(
            session_factory(writer_engine(engine)),
            cutoff=cutoff_for(settings.retention_days, now),
            batch_size=settings.retention_batch_size,
        )
    finally:
        engine.dispose()


class RetentionLoop:
    """The embedded default's scheduler (no broker, so no beat): a daemon thread that runs
    retention at start and then every `retention_interval_seconds`."""

    def __init__(self, settings: Settings, sessions: Callable[[], Session]):
        self.settings, self.sessions = settings, sessions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    @property
    def enabled(self) -> bool:
        return self.settings.retention_days > 0 and self.settings.retention_interval_seconds > 0

    def run_once(self) -> RetentionResult:
        result = run_retention(
            self.sessions,
            cutoff=cutoff_for(self.settings.retention_days),
            batch_size=self.settings.retention_batch_size,
        )
        self.runs += 1
        return result

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="auditor-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # a failed run is logged and retried next interval
                log.exception("retention run failed")
            if self._stop.wait(self.settings.retention_interval_seconds):
                return
