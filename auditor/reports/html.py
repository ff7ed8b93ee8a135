"""A Report as one self-contained HTML page: inline CSS and inline SVG figures, no scripts, no
external requests (it is opened from disk or an incident ticket).

Text shown of prompts and completions is already reduced to what each request's privacy mode
allows (queries.shown_text); nothing here reads the database.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from auditor.reports.aggregate import DRIFT_P_VALUE, DRIFT_PSI, ConceptSummary, DriftRow
from auditor.reports.queries import ComparisonRow, FlaggedRequest
from auditor.reports.render import cell, window_line
from auditor.reports.report import Report

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
    return ("num", cell(value, digits))


def _txt(value: Any) -> tuple[str, str]:
    return ("", cell(value))


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
                ("text", cell(r.prompt)),
                ("text", cell(r.completion)),
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
<p class="meta">{html.escape(window_line(report))} · buckets per {report.bucket} ·
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
