"""Report reads, portable across Postgres and SQLite (no date_trunc, no percentile_cont).

Everything is read at each concept version's primary layer, and windowed by the request's
creation time: `request_scores.created_at` is a copy of it, and flags are joined to their
request, so scores, flags and rates in one window always describe the same requests.
Aggregates SQL can compute portably (counts, averages, rankings) run in the database; what it
cannot (percentiles, drift statistics, time buckets) is computed from fetched values in
`aggregate.py`.

Past retention (auditor.db.retention) a request's rows are gone and only daily rollups remain: the
daily time series reads them (`fetch_rollups`); summaries, drift, comparisons and the flagged
list need per-request rows and cover the retention window only.

Size: the report's reads share their window and primary-layer filters; one module keeps every
query that must agree on "which requests" side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time

import numpy as np
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from auditor import privacy
from auditor.db.models import Concept, DailyRollup, Flag, MonitoredRequest, RequestScore
from auditor.errors import NotFoundError
from auditor.reports.window import Window


@dataclass(frozen=True)
class ConceptRef:
    """One concept version, read at its primary layer."""

    concept_id: int
    concept: str
    version: int
    layer: int
    model_id: str  # the model the vector was extracted from

    @property
    def label(self) -> str:
        return f"{self.concept} v{self.version}"


@dataclass(frozen=True)
class ScoreSample:
    """One concept version's primary-layer scores in one window, oldest first."""

    times: np.ndarray  # [n] epoch seconds (UTC)
    score: np.ndarray  # [n] raw score: mean per-token cosine
    z: np.ndarray  # [n] calibrated z-score, NaN where the score was stored uncalibrated

    @classmethod
    def empty(cls) -> ScoreSample:
        return cls(np.empty(0), np.empty(0), np.empty(0))


@dataclass
class FlaggedSet:
    """The requests flagged for one concept version in one window."""

    times: dict[str, float] = field(default_factory=dict)  # request id -> epoch seconds
    by_kind: dict[str, set[str]] = field(default_factory=dict)  # flag kind -> request ids


@dataclass(frozen=True)
class ComparisonRow:
    model_id: str | None  # the model that served the requests
    concept: str
    version: int
    concept_id: int
    requests: int
    mean_z: float | None
    mean_score: float
    flagged: int
    flagged_rate: float


@dataclass(frozen=True)
class FlaggedRequest:
    concept: str
    version: int
    concept_id: int
    rank: int
    request_id: str
    created_at: datetime
    model_id: str | None
    kind: str
    layer: int
    residual_signal: float
    text_signal: float | None
    threshold: float
    margin: float  # |residual_signal − threshold|: how far past its threshold the flag sits
    reason: str
    privacy_mode: str
    prompt: str | None  # as its mode allows: text, redacted text, or "sha256:<hex>"
    completion: str | None


def shown_text(privacy_mode: str, text: str | None, sha256: str | None) -> str | None:
    """What a report may show of a prompt or completion: the text in `full` mode, the text
    redacted (again) in `redacted` mode, the digest in `hash` mode — never more than the mode
    promises, even if a row holds more (say, one written before a mode change)."""
    return privacy.shown_text(privacy_mode, text, sha256)


def _in_window(column, window: Window):
    return and_(column >= window.start, column < window.end)


def _at_primary_layer():
    return and_(Concept.id == RequestScore.concept_id, Concept.primary_layer == RequestScore.layer)


def resolve_concepts(session: Session, *, names: Sequence[str] | None, windows: Iterable[Window]) -> list[ConceptRef]:
    """The concept versions a report covers: those of `names` (all when None) that are active or
    have scores in one of `windows` — a retired version still shows the traffic it scored. An
    unknown name is a NotFoundError."""
    query = select(Concept).order_by(Concept.name, Concept.version)
    if names:
        known = set(session.scalars(select(Concept.name).distinct()))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise NotFoundError(f"unknown concept {unknown[0]!r}; known concepts: {', '.join(sorted(known)) or 'none'}")
        query = query.where(Concept.name.in_(names))
    windows = list(windows)
    scored_in = [
        exists().where(RequestScore.concept_id == Concept.id, _in_window(RequestScore.created_at, window))
        for window in windows
    ]
    # ... or, past retention, rolled up on a day of the window.
    scored_in += [
        exists().where(
            DailyRollup.concept_id == Concept.id,
            DailyRollup.day >= window.start.date(), DailyRollup.day <= window.end.date(),
        )
        for window in windows
    ]  # fmt: skip
    query = query.where(or_(Concept.active.is_(True), *scored_in))
    return [ConceptRef(c.id, c.name, c.version, c.primary_layer, c.model_id) for c in session.scalars(query)]


def fetch_scores(session: Session, *, refs: Sequence[ConceptRef], window: Window) -> dict[int, ScoreSample]:
    """concept id -> its primary-layer scores in `window` (one indexed range scan per window;
    only three floats per row are kept)."""
    if not refs:
        return {}
    query = (
        select(
            RequestScore.concept_id, RequestScore.created_at, RequestScore.mean,
            RequestScore.answer_z,  # against ordinary answers of the same length
        )
        .join(Concept, _at_primary_layer())
        .where(
            RequestScore.concept_id.in_([ref.concept_id for ref in refs]),
            _in_window(RequestScore.created_at, window),
        )
        .order_by(RequestScore.concept_id, RequestScore.created_at)
    )  # fmt: skip
    columns: dict[int, tuple[list[float], list[float], list[float]]] = {}
    for concept_id, created_at, score, z in session.execute(query):
        times, scores, zs = columns.setdefault(concept_id, ([], [], []))
        times.append(created_at.timestamp())
        scores.append(score)
        zs.append(np.nan if z is None else z)
    samples = {ref.concept_id: ScoreSample.empty() for ref in refs}
    for concept_id, (times, scores, zs) in columns.items():
        samples[concept_id] = ScoreSample(np.array(times), np.array(scores), np.array(zs))
    return samples


@dataclass(frozen=True)
class RollupDay:
    """One UTC day of a concept version's traffic past retention (auditor.db.retention), summed
    over serving models."""

    start: float  # epoch seconds of the day's midnight (UTC)
    requests: int
    score_sum: float
    z_count: int
    z_sum: float
    flagged: int


def _midnight(day) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def fetch_rollups(session: Session, *, refs: Sequence[ConceptRef], window: Window) -> dict[int, list[RollupDay]]:
    """concept id -> its rolled-up days that start inside `window`, oldest first. A day that
    starts before the window is left out: it would bring requests from before the window."""
    rollups: dict[int, list[RollupDay]] = {ref.concept_id: [] for ref in refs}
    if not refs:
        return rollups
    r = DailyRollup
    query = (
        select(r.concept_id, r.day, func.sum(r.requests), func.sum(r.score_sum), func.sum(r.z_count),
               func.sum(r.z_sum), func.sum(r.flagged))
        .where(r.concept_id.in_(list(rollups)), r.day >= window.start.date(), r.day <= window.end.date())
        .group_by(r.concept_id, r.day)
        .order_by(r.concept_id, r.day)
    )  # fmt: skip
    for concept_id, day, n, score_sum, z_count, z_sum, n_flagged in session.execute(query):
        start = _midnight(day)
        if window.start <= start < window.end:
            rollups[concept_id].append(
                RollupDay(start.timestamp(), int(n), float(score_sum), int(z_count), float(z_sum), int(n_flagged))
            )
    return rollups


def fetch_flagged(session: Session, *, refs: Sequence[ConceptRef], window: Window) -> dict[int, FlaggedSet]:
    """concept id -> the requests created in `window` that carry a flag for it (at any layer),
    by flag kind. A request flagged twice counts once."""
    flagged = {ref.concept_id: FlaggedSet() for ref in refs}
    if not refs:
        return flagged
    query = (
        select(Flag.concept_id, Flag.kind, Flag.request_id, MonitoredRequest.created_at)
        .join(MonitoredRequest, MonitoredRequest.id == Flag.request_id)
        .where(
            Flag.concept_id.in_(list(flagged)),
            _in_window(MonitoredRequest.created_at, window),
        )
        .distinct()
    )
    for concept_id, kind, request_id, created_at in session.execute(query):
        entry = flagged[concept_id]
        entry.times[request_id] = created_at.timestamp()
        entry.by_kind.setdefault(kind, set()).add(request_id)
    return flagged


def fetch_thresholds(session: Session, *, refs: Sequence[ConceptRef]) -> dict[int, float]:
    """concept id -> a single alert threshold, if there were one. There is not: answers are
    read against ordinary answers of their own length, so the alert threshold (z units) depends
    on each answer's length and is stored with each alert (`flags.threshold`, kind
    `threshold`). Kept as an empty mapping so report shapes stay stable."""
    return {}


def compare(session: Session, *, refs: Sequence[ConceptRef], window: Window) -> list[ComparisonRow]:
    """Per (serving model, concept, version): requests, mean z and raw score, flagged requests."""
    if not refs:
        return []
    by_id = {ref.concept_id: ref for ref in refs}
    flagged = select(Flag.request_id, Flag.concept_id).where(Flag.concept_id.in_(list(by_id))).distinct().subquery()
    query = (
        select(
            MonitoredRequest.model_id, RequestScore.concept_id, func.count(),
            func.avg(RequestScore.answer_z), func.avg(RequestScore.mean),
            func.count(flagged.c.request_id),
        )
        .select_from(RequestScore)
        .join(Concept, _at_primary_layer())
        .join(MonitoredRequest, MonitoredRequest.id == RequestScore.request_id)
        .outerjoin(flagged, and_(
            flagged.c.request_id == RequestScore.request_id,
            flagged.c.concept_id == RequestScore.concept_id,
        ))
        .where(
            RequestScore.concept_id.in_(list(by_id)),
            _in_window(RequestScore.created_at, window),
        )
        .group_by(MonitoredRequest.model_id, RequestScore.concept_id)
    )  # fmt: skip
    rows = [
        ComparisonRow(
            model_id=model_id,
            concept=by_id[concept_id].concept,
            version=by_id[concept_id].version,
            concept_id=concept_id,
            requests=n,
            mean_z=None if mean_z is None else float(mean_z),
            mean_score=float(mean_score),
            flagged=n_flagged,
            flagged_rate=n_flagged / n,
        )
        for model_id, concept_id, n, mean_z, mean_score, n_flagged in session.execute(query)
    ]
    return sorted(rows, key=lambda row: (row.concept, row.version, row.model_id or ""))


def top_flagged(session: Session, *, refs: Sequence[ConceptRef], window: Window, top: int) -> list[FlaggedRequest]:
    """Per concept version, the `top` flagged requests in `window`, strongest first: each request
    once, by its flag that sits furthest from its threshold (a hidden flag far above, a surface
    flag far below). Ranked with window functions, which both backends support."""
    if not refs or top < 1:
        return []
    by_id = {ref.concept_id: ref for ref in refs}
    margin = func.abs(Flag.residual_signal - Flag.threshold)
    strongest_per_request = (
        select(
            Flag.concept_id, Flag.request_id, Flag.kind, Flag.layer, Flag.residual_signal,
            Flag.text_signal, Flag.threshold, Flag.reason, margin.label("margin"),
            MonitoredRequest.created_at, MonitoredRequest.model_id, MonitoredRequest.privacy_mode,
            MonitoredRequest.prompt_text, MonitoredRequest.prompt_sha256,
            MonitoredRequest.completion_text, MonitoredRequest.completion_sha256,
            func.row_number().over(
                partition_by=(Flag.concept_id, Flag.request_id), order_by=(margin.desc(), Flag.id)
            ).label("nth_flag"),
        )
        .join(MonitoredRequest, MonitoredRequest.id == Flag.request_id)
        .where(Flag.concept_id.in_(list(by_id)), _in_window(MonitoredRequest.created_at, window))
        .subquery()
    )  # fmt: skip
    s = strongest_per_request.c
    ranked = (
        select(
            strongest_per_request,
            func.row_number()
            .over(
                partition_by=s.concept_id,
                order_by=(s.margin.desc(), s.created_at.desc(), s.request_id),
            )
            .label("rank"),
        )
        .where(s.nth_flag == 1)
        .subquery()
    )
    rows = session.execute(
        select(ranked).where(ranked.c.rank <= top).order_by(ranked.c.concept_id, ranked.c.rank)
    ).mappings()
    return sorted(
        (_flagged_request(by_id[row["concept_id"]], row) for row in rows),
        key=lambda flagged: (flagged.concept, flagged.version, flagged.rank),
    )


def _flagged_request(ref: ConceptRef, row) -> FlaggedRequest:
    mode = row["privacy_mode"]
    return FlaggedRequest(
        concept=ref.concept,
        version=ref.version,
        concept_id=ref.concept_id,
        rank=row["rank"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        model_id=row["model_id"],
        kind=row["kind"],
        layer=row["layer"],
        residual_signal=row["residual_signal"],
        text_signal=row["text_signal"],
        threshold=row["threshold"],
        margin=row["margin"],
        reason=row["reason"],
        privacy_mode=mode,
        prompt=shown_text(mode, row["prompt_text"], row["prompt_sha256"]),
        completion=shown_text(mode, row["completion_text"], row["completion_sha256"]),
    )
