"""/reports: the audit report's sections as JSON (or CSV), and the whole report as one HTML page.

Every endpoint takes the same window parameters: `since` / `until` (ISO times, `now`, or how
long ago: `24h`, `7d`), `baseline` (a duration ending at `since`, or `START/END`; default the
window's own length just before it) and `concept` (repeatable; every version of each name).
Read-only: nothing here writes, and no session here takes SQLite's write lock (ReadSessionDep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import Session

from auditor.api.deps import ReadSessionDep
from auditor.api.errors import error_body, query_error
from auditor.db.models import utcnow
from auditor.errors import NotFoundError, WindowError
from auditor.reports import build_report, queries, report
from auditor.reports.aggregate import ConceptSummary, DriftRow, SeriesPoint
from auditor.reports.html import to_html
from auditor.reports.queries import ComparisonRow, ConceptRef, FlaggedRequest
from auditor.reports.render import jsonable, rows_to_csv, window_json
from auditor.reports.window import Window, baseline_window, choose_bucket, report_window

router = APIRouter(prefix="/reports", tags=["reports"])

Format = Annotated[Literal["json", "csv"], Query(description="json, or csv for the rows alone")]
Top = Annotated[int, Query(ge=1, le=1000, description="flagged requests listed per concept version")]
Bucket = Annotated[Literal["auto", "hour", "day"], Query(description="auto = hourly up to 3 days, else daily")]


@dataclass(frozen=True)
class ReportQuery:
    window: Window
    baseline: Window
    concepts: list[str] | None


def report_query(
    since: Annotated[str, Query(description="window start: ISO time, or how long ago (24h, 7d)")] = "24h",
    until: Annotated[str, Query(description="window end, exclusive: ISO time, how long ago, or 'now'")] = "now",
    baseline: Annotated[str | None, Query(description="a duration ending at `since` (7d), or START/END")] = None,
    concept: Annotated[list[str] | None, Query(description="concept name; repeatable; default all")] = None,
) -> ReportQuery:
    """The windows, parsed against the current time; a bad one is a 422 in FastAPI's own shape,
    naming the parameter."""
    now = utcnow()
    values = {"since": since, "until": until, "baseline": baseline}
    try:
        window = report_window(since, until, now=now)
        return ReportQuery(window, baseline_window(baseline, window=window, now=now), concept or None)
    except WindowError as exc:
        raise query_error(exc, values.get(exc.field)) from None


ReportQueryDep = Annotated[ReportQuery, Depends(report_query)]


def _concept_not_found(exc: NotFoundError) -> JSONResponse:
    # 404 as for an unknown concept in /v1 completions, naming the query parameter.
    return JSONResponse(error_body(str(exc), "concept_not_found", ("query", "concept")), status_code=404)


def _section(
    session: Session,
    query: ReportQuery,
    row_type: type,
    build: Callable[[list[ConceptRef]], Sequence[Any]],
    output_format: str,
) -> Response:
    """Resolve the concepts (an unknown name is a 404), build the rows,
    and answer with JSON (rows with their windows) or CSV (the rows alone)."""
    try:
        refs = queries.resolve_concepts(session, names=query.concepts, windows=(query.window, query.baseline))
    except NotFoundError as exc:
        return _concept_not_found(exc)
    rows = build(refs)
    if output_format == "csv":
        return Response(rows_to_csv(row_type, rows), media_type="text/csv; charset=utf-8")
    return JSONResponse({
        "window": window_json(query.window),
        "baseline": window_json(query.baseline),
        "rows": jsonable(list(rows)),
    })  # fmt: skip


@router.get("/summary")
def summary(session: ReadSessionDep, query: ReportQueryDep, format: Format = "json") -> Response:
    """Per concept version: scored requests, mean / p50 / p95 calibrated z, share above the
    calibration threshold, flagged requests (by kind) and flagged rate."""
    return _section(
        session,
        query,
        ConceptSummary,
        lambda refs: report.summary_section(session, refs=refs, window=query.window),
        format,
    )


@router.get("/flagged")
def flagged(session: ReadSessionDep, query: ReportQueryDep, top: Top = 20, format: Format = "json") -> Response:
    """The `top` flagged requests per concept version, strongest first; prompt and completion as
    its privacy mode allows (text, redacted text, or `sha256:<hex>`)."""
    return _section(
        session,
        query,
        FlaggedRequest,
        lambda refs: queries.top_flagged(session, refs=refs, window=query.window, top=top),
        format,
    )


@router.get("/compare")
def compare(session: ReadSessionDep, query: ReportQueryDep, format: Format = "json") -> Response:
    """Per (serving model, concept, version): requests, mean z and raw score, flagged rate."""
    return _section(
        session, query, ComparisonRow, lambda refs: queries.compare(session, refs=refs, window=query.window), format
    )


@router.get("/drift")
def drift(session: ReadSessionDep, query: ReportQueryDep, format: Format = "json") -> Response:
    """Per concept version: raw scores in the window against the baseline window — population
    stability index, two-sample KS statistic and p-value, and a verdict."""
    return _section(
        session, query, DriftRow,
        lambda refs: report.drift_section(session, refs=refs, window=query.window, baseline=query.baseline),
        format,
    )  # fmt: skip


@router.get("/series")
def series(
    session: ReadSessionDep, query: ReportQueryDep, bucket: Bucket = "auto", format: Format = "json"
) -> Response:
    """Per concept version and UTC hour or day with scores: requests, mean z and flagged rate."""
    chosen = choose_bucket(bucket, query.window)
    return _section(
        session,
        query,
        SeriesPoint,
        lambda refs: report.series_section(session, refs=refs, window=query.window, bucket=chosen),
        format,
    )


@router.get("/html", response_class=HTMLResponse)
def html_report(session: ReadSessionDep, query: ReportQueryDep, top: Top = 20, bucket: Bucket = "auto") -> Response:
    """The whole report as one self-contained page: tables and inline SVG plots, no scripts."""
    try:
        built = build_report(
            session,
            query.window.start,
            query.window.end,
            query.baseline.start,
            query.baseline.end,
            concepts=query.concepts,
            top=top,
            bucket=bucket,
        )
    except NotFoundError as exc:
        return _concept_not_found(exc)
    return HTMLResponse(to_html(built))
