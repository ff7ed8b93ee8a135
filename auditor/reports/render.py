"""A Report as CSV (one section), JSON, a text table, or one self-contained HTML page.

Text a report shows of prompts and completions is already reduced to what each request's
privacy mode allows (queries.shown_text); nothing here reads the database.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from auditor.errors import InvalidInputError
from auditor.reports.aggregate import (
    DRIFT_P_VALUE,
    DRIFT_PSI,
    ConceptSummary,
    DriftRow,
    SeriesPoint,
)
from auditor.reports.queries import ComparisonRow, FlaggedRequest
from auditor.reports.report import Report
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
# are never text here, so a negative score is untouched. JSON stays the exact format.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _flat(row: Any) -> dict[str, Any]:
    """One CSV record: dict-valued fields (flag counts by kind) become `field.key` columns."""
    flat: dict[str, Any] = {}
    for name, value in jsonable(row).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": _csv_cell(item) for key, item in value.items()})
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


def _cell(value: Any, digits: int = 3) -> str:
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
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_SNIPPET else flat[: TEXT_SNIPPET - 1] + "…"


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
        table.add_row(
            f"{r.concept} v{r.version}",
            r.model_id,
            str(r.layer),
            str(r.requests),
            _cell(r.mean_z),
            _cell(r.p50_z),
            _cell(r.p95_z),
            _cell(r.above_threshold_rate),
            str(r.flagged),
            _cell(r.flagged_rate),
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
        table.add_row(
            f"{r.concept} v{r.version}",
            str(r.baseline_requests),
            str(r.recent_requests),
            _cell(r.baseline_mean_score, 4),
            _cell(r.recent_mean_score, 4),
            _cell(r.psi),
            _cell(r.ks_statistic),
            _cell(r.p_value),
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
        table.add_row(
            r.model_id or "—",
            f"{r.concept} v{r.version}",
            str(r.requests),
            _cell(r.mean_z),
            _cell(r.mean_score, 4),
            str(r.flagged),
            _cell(r.flagged_rate),
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
        table.add_row(
            f"{r.concept} v{r.version}",
            str(r.rank),
            r.request_id,
            _cell(r.created_at),
            r.kind,
            str(r.layer),
            _cell(r.residual_signal),
            _cell(r.threshold),
            r.privacy_mode,
            _snippet(r.prompt),
            _snippet(r.completion),
        )
    return table


def _window_line(report: Report) -> str:
    window, baseline = report.window, report.baseline
    return (
        f"window {window.start.isoformat()} → {window.end.isoformat()}   "
        f"baseline {baseline.start.isoformat()} → {baseline.end.isoformat()}"
    )


def to_text(report: Report, width: int = TEXT_WIDTH) -> str:
    """Summary, drift, comparison and top-flagged tables as plain text (no colour codes)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(_window_line(report))
    for table in (
        _summary_table(report.summary),
        _drift_table(report.drift),
        _comparison_table(report.comparison),
        _flagged_table(report.flagged),
    ):
        console.print(table)
    return buffer.getvalue()


# ---- HTML ----

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { max-width: 28rem; white-space: pre-wrap; word-break: break-word; }
.drift { color: #b00020; font-weight: 600; } .meta { color: #555; }
figure.plot { margin: 1rem 0; } figure.plot svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 13px; }
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """rows of (css class, text) cells; every text is escaped here."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{css}">{html.escape(text)}</td>' for css, text in row) + "</tr>" for row in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(headers)}">none in this window</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any, digits: int = 3) -> tuple[str, str]:
    return ("num", _cell(value, digits))


def _txt(value: Any) -> tuple[str, str]:
    return ("", _cell(value))


def _summary_html(rows: Sequence[ConceptSummary]) -> str:
    return _html_table(
        [
            "concept",
            "model",
            "layer",
            "requests",
            "mean z",
            "p50 z",
            "p95 z",
            "above threshold",
            "flagged",
            "flagged rate",
            "flagged by kind",
        ],
        [
            [
                _txt(f"{r.concept} v{r.version}"),
                _txt(r.model_id),
                _num(r.layer),
                _num(r.requests),
                _num(r.mean_z),
                _num(r.p50_z),
                _num(r.p95_z),
                _num(r.above_threshold_rate),
                _num(r.flagged),
                _num(r.flagged_rate),
                _txt(", ".join(f"{kind} {n}" for kind, n in r.flagged_by_kind.items() if n) or None),
            ]
            for r in rows
        ],
    )


def _drift_html(rows: Sequence[DriftRow]) -> str:
    return _html_table(
        ["concept", "baseline n", "recent n", "baseline mean", "recent mean", "PSI", "KS D", "p-value", "status"],
        [
            [
                _txt(f"{r.concept} v{r.version}"),
                _num(r.baseline_requests),
                _num(r.recent_requests),
                _num(r.baseline_mean_score, 4),
                _num(r.recent_mean_score, 4),
                _num(r.psi),
                _num(r.ks_statistic),
                _num(r.p_value),
                ("drift" if r.status == "drift" else "", r.status),
            ]
            for r in rows
        ],
    )


def _comparison_html(rows: Sequence[ComparisonRow]) -> str:
    return _html_table(
        ["serving model", "concept", "requests", "mean z", "mean score", "flagged", "flagged rate"],
        [
            [
                _txt(r.model_id),
                _txt(f"{r.concept} v{r.version}"),
                _num(r.requests),
                _num(r.mean_z),
                _num(r.mean_score, 4),
                _num(r.flagged),
                _num(r.flagged_rate),
            ]
            for r in rows
        ],
    )


def _flagged_html(rows: Sequence[FlaggedRequest]) -> str:
    return _html_table(
        [
            "concept",
            "#",
            "request",
            "created (UTC)",
            "model",
            "kind",
            "layer",
            "residual",
            "text signal",
            "threshold",
            "reason",
            "privacy",
            "prompt",
            "completion",
        ],
        [
            [
                _txt(f"{r.concept} v{r.version}"),
                _num(r.rank),
                _txt(r.request_id),
                _txt(r.created_at),
                _txt(r.model_id),
                _txt(r.kind),
                _num(r.layer),
                _num(r.residual_signal),
                _num(r.text_signal),
                _num(r.threshold),
                ("text", r.reason),
                _txt(r.privacy_mode),
                ("text", _cell(r.prompt)),
                ("text", _cell(r.completion)),
            ]
            for r in rows
        ],
    )


def _figures_html(report: Report) -> str:
    from auditor.reports.plots import FIGURES, inline_svg  # matplotlib only when drawing

    return "\n".join(
        f'<figure class="plot" id="{plot_id}">{inline_svg(build(report), plot_id)}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for plot_id, caption, build in FIGURES
    )


def to_html(report: Report) -> str:
    """One page, no external assets and no scripts: inline CSS and inline SVG plots."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Auditor report {html.escape(report.window.start.isoformat())} – {html.escape(report.window.end.isoformat())}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Auditor report</h1>
<p class="meta">{html.escape(_window_line(report))} · buckets per {report.bucket} ·
generated {html.escape(report.generated_at.isoformat(timespec="seconds"))} · scores at each concept
version's primary layer; z is the calibrated score, the raw score the mean per-token cosine</p>
<h2>Summary</h2>
{_summary_html(report.summary)}
<h2>Drift against the baseline</h2>
<p class="meta">PSI over the baseline's deciles and a two-sample Kolmogorov–Smirnov test on raw
scores; "drift" means PSI ≥ {DRIFT_PSI} and p &lt; {DRIFT_P_VALUE}.</p>
{_drift_html(report.drift)}
<h2>Plots</h2>
{_figures_html(report)}
<h2>By serving model and concept version</h2>
{_comparison_html(report.comparison)}
<h2>Top flagged requests</h2>
<p class="meta">Prompts and completions as each request's privacy mode allows: text in full
mode, text with personal data masked in redacted mode, sha256 digests in hash mode.</p>
{_flagged_html(report.flagged)}
</body>
</html>
"""
