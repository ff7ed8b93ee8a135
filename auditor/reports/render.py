"""A Report as CSV (one section), JSON or a text table (the HTML page: auditor.reports.html).

Text a report shows of prompts and completions is already reduced to what each request's
privacy mode allows (queries.shown_text); nothing here reads the database.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from auditor.errors import InvalidInputError
from auditor.reports.aggregate import (
    ConceptSummary,
    DriftRow,
    SeriesPoint,
)
from auditor.reports.queries import ComparisonRow, FlaggedRequest
from auditor.reports.report import Report
from auditor.reports.safe_text import visible_controls
from auditor.reports.window import Window

# Report fields that are tables, and the type of their rows.
SECTIONS: dict[str, type] = {
    "summary": ConceptSummary,
    "drift": DriftRow,
    "comparison": ComparisonRow,
    "flagged": FlaggedRequest,
    "series": SeriesPoint,
}
TEXT_WIDTH = 160
TEXT_SNIPPET = 60  # characters of a prompt or completion in the text table


def section_rows(report: Report, section: str) -> list[Any]:
    if section not in SECTIONS:
        raise InvalidInputError(f"unknown report section {section!r}; choose one of {', '.join(SECTIONS)}")
    return getattr(report, section)


# ---- JSON ----


def jsonable(value: Any) -> Any:
    """Plain JSON values: ISO 8601 times, None for NaN (JSON has no NaN), dataclasses as objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def window_json(window: Window) -> dict[str, str]:
    return {"start": window.start.isoformat(), "end": window.end.isoformat()}


def report_json(report: Report) -> dict[str, Any]:
    return {
        "window": window_json(report.window),
        "baseline": window_json(report.baseline),
        "bucket": report.bucket,
        "generated_at": report.generated_at.isoformat(),
        **{section: jsonable(section_rows(report, section)) for section in SECTIONS},
    }


def to_json(report: Report) -> str:
    return json.dumps(report_json(report), indent=2, allow_nan=False)


# ---- CSV ----


# A spreadsheet runs a cell that starts with one of these as a formula; prompts and completions
# are user-controlled text (CSV injection). Text cells get a leading ' (OWASP's advice); numbers
# are never text here, so a negative score is untouched. Control characters are spelled as
# escapes (a CSV is also read with `cat`); line breaks and tabs stay, quoted. JSON stays exact.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = visible_controls(value, keep_line_breaks=True)
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def _flat(row: Any) -> dict[str, Any]:
    """One CSV record: dict-valued fields (flag counts by kind) become `field.key` columns."""
    flat: dict[str, Any] = {}
    for name, value in jsonable(row).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{visible_controls(key)}": _csv_cell(item) for key, item in value.items()})
        else:
            flat[name] = _csv_cell(value)
    return flat


def rows_to_csv(row_type: type, rows: Sequence[Any]) -> str:
    """Header from the first row (or the row type's fields when there are none); None is empty."""
    records = [_flat(row) for row in rows]
    columns = list(records[0]) if records else [f.name for f in dataclasses.fields(row_type)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def to_csv(report: Report, section: str = "summary") -> str:
    rows = section_rows(report, section)
    return rows_to_csv(SECTIONS[section], rows)


# ---- text ----


def cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _snippet(text: str | None) -> str:
    if text is None:
        return "—"
    # Escaped before the cut: the snippet is as long as what the operator sees.
    flat = visible_controls(" ".join(text.split()))
    return flat if len(flat) <= TEXT_SNIPPET else flat[: TEXT_SNIPPET - 1] + "…"


def _add_row(table: Table, *cells: str) -> None:
    """Each cell as plain Text: rich reads a str cell as markup (a prompt's "[/x]" would raise,
    its "[bold]" would style), and passes ESC through; Text is shown as it is, controls escaped."""
    table.add_row(*(Text(visible_controls(text)) for text in cells))


def _summary_table(rows: Sequence[ConceptSummary]) -> Table:
    table = Table(
        "concept",
        "model",
        "layer",
        "requests",
        "mean z",
        "p50 z",
        "p95 z",
        "above thr.",
        "flagged",
        "rate",
        "by kind",
        title="Summary",
    )
    for r in rows:
        kinds = ", ".join(f"{kind} {n}" for kind, n in r.flagged_by_kind.items() if n) or "—"
        _add_row(
            table,
            f"{r.concept} v{r.version}",
            r.model_id,
            str(r.layer),
            str(r.requests),
            cell(r.mean_z),
            cell(r.p50_z),
            cell(r.p95_z),
            cell(r.above_threshold_rate),
            str(r.flagged),
            cell(r.flagged_rate),
            kinds,
        )
    return table


def _drift_table(rows: Sequence[DriftRow]) -> Table:
    table = Table(
        "concept",
        "baseline n",
        "recent n",
        "baseline mean",
        "recent mean",
        "PSI",
        "KS D",
        "p-value",
        "status",
        title="Drift (raw score, recent vs baseline)",
    )
    for r in rows:
        _add_row(
            table,
            f"{r.concept} v{r.version}",
            str(r.baseline_requests),
            str(r.recent_requests),
            cell(r.baseline_mean_score, 4),
            cell(r.recent_mean_score, 4),
            cell(r.psi),
            cell(r.ks_statistic),
            cell(r.p_value),
            r.status,
        )
    return table


def _comparison_table(rows: Sequence[ComparisonRow]) -> Table:
    table = Table(
        "serving model",
        "concept",
        "requests",
        "mean z",
        "mean score",
        "flagged",
        "rate",
        title="By model and concept version",
    )
    for r in rows:
        _add_row(
            table,
            r.model_id or "—",
            f"{r.concept} v{r.version}",
            str(r.requests),
            cell(r.mean_z),
            cell(r.mean_score, 4),
            str(r.flagged),
            cell(r.flagged_rate),
        )
    return table


def _flagged_table(rows: Sequence[FlaggedRequest]) -> Table:
    table = Table(
        "concept",
        "#",
        "request",
        "created (UTC)",
        "kind",
        "layer",
        "residual",
        "threshold",
        "privacy",
        "prompt",
        "completion",
        title="Top flagged requests",
    )
    for r in rows:
        _add_row(
            table,
            f"{r.concept} v{r.version}",
            str(r.rank),
            r.request_id,
            cell(r.created_at),
            r.kind,
            str(r.layer),
            cell(r.residual_signal),
            cell(r.threshold),
            r.privacy_mode,
            _snippet(r.prompt),
            _snippet(r.completion),
        )
    return table


def window_line(report: Report) -> str:
    window, baseline = report.window, report.baseline
    return (
        f"window {window.start.isoformat()} → {window.end.isoformat()}   "
        f"baseline {baseline.start.isoformat()} → {baseline.end.isoformat()}"
    )


def to_text(report: Report, width: int = TEXT_WIDTH) -> str:
    """Summary, drift, comparison and top-flagged tables as plain text (no colour codes)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(Text(window_line(report)))
    for table in (
        _summary_table(report.summary),
        _drift_table(report.drift),
        _comparison_table(report.comparison),
        _flagged_table(report.flagged),
    ):
        console.print(table)
    return buffer.getvalue()


# ---- HTML ----
