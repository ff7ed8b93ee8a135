"""A whole audit report, and each of its sections on its own (the API serves them separately)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from auditor.db.models import utcnow
from auditor.reports import aggregate, queries
from auditor.reports.aggregate import ConceptSummary, DriftRow, SeriesPoint
from auditor.reports.queries import ComparisonRow, ConceptRef, FlaggedRequest, ScoreSample
from auditor.reports.window import Window, check_disjoint, choose_bucket


@dataclass(frozen=True)
class Report:
    window: Window
    baseline: Window
    bucket: str  # "hour" or "day"
    generated_at: datetime
    concepts: list[ConceptRef]
    summary: list[ConceptSummary]
    drift: list[DriftRow]
    comparison: list[ComparisonRow]
    flagged: list[FlaggedRequest]
    series: list[SeriesPoint]
    # The raw samples behind the drift rows, for the distribution plot; never exported.
    baseline_scores: dict[int, ScoreSample] = field(repr=False)
    recent_scores: dict[int, ScoreSample] = field(repr=False)


def summary_section(session: Session, *, refs: Sequence[ConceptRef], window: Window) -> list[ConceptSummary]:
    return aggregate.summarize(
        refs,
        queries.fetch_scores(session, refs=refs, window=window),
        queries.fetch_flagged(session, refs=refs, window=window),
        queries.fetch_thresholds(session, refs=refs),
    )


def drift_section(session: Session, *, refs: Sequence[ConceptRef], window: Window, baseline: Window) -> list[DriftRow]:
    return aggregate.drift(
        refs,
        queries.fetch_scores(session, refs=refs, window=baseline),
        queries.fetch_scores(session, refs=refs, window=window),
    )


def _rollups(session: Session, refs: Sequence[ConceptRef], window: Window, bucket: str):
    """Days past retention, for daily series (an hour cannot be cut out of a daily rollup)."""
    return queries.fetch_rollups(session, refs=refs, window=window) if bucket == "day" else None


def series_section(session: Session, *, refs: Sequence[ConceptRef], window: Window, bucket: str) -> list[SeriesPoint]:
    return aggregate.time_series(
        refs,
        queries.fetch_scores(session, refs=refs, window=window),
        queries.fetch_flagged(session, refs=refs, window=window),
        bucket,
        _rollups(session, refs, window, bucket),
    )


def build_report(
    session: Session,
    start: datetime,
    end: datetime,
    baseline_start: datetime,
    baseline_end: datetime,
    concepts: Sequence[str] | None = None,
    top: int = 20,
    *,
    bucket: str | None = None,
) -> Report:
    """Every section over [start, end), drift against [baseline_start, baseline_end).
    `concepts`: names (every version of each); None = all active or scored ones. `bucket`:
    hour, day, or None for a choice by window length."""
    window, baseline = Window(start, end), Window(baseline_start, baseline_end)
    check_disjoint(window, baseline)
    chosen_bucket = choose_bucket(bucket, window)
    refs = queries.resolve_concepts(session, names=concepts, windows=(window, baseline))
    recent = queries.fetch_scores(session, refs=refs, window=window)
    old = queries.fetch_scores(session, refs=refs, window=baseline)
    flagged = queries.fetch_flagged(session, refs=refs, window=window)
    thresholds = queries.fetch_thresholds(session, refs=refs)
    return Report(
        window=window,
        baseline=baseline,
        bucket=chosen_bucket,
        generated_at=utcnow(),
        concepts=refs,
        summary=aggregate.summarize(refs, recent, flagged, thresholds),
        drift=aggregate.drift(refs, old, recent),
        comparison=queries.compare(session, refs=refs, window=window),
        flagged=queries.top_flagged(session, refs=refs, window=window, top=top),
        series=aggregate.time_series(
            refs, recent, flagged, chosen_bucket, _rollups(session, refs, window, chosen_bucket)
        ),
        baseline_scores=old,
        recent_scores=recent,
    )
