"""Audit reports: per concept over a time window — score summaries, top flagged requests (shown
only as far as each request's privacy mode allows), comparison across models and concept
versions, drift against a baseline window — as a table, CSV, JSON, or a self-contained HTML page
with inline SVG plots.

    queries.py    reads (SQL, portable across Postgres and SQLite)
    aggregate.py  statistics from fetched scores (summaries, time buckets, drift)
    report.py     the Report and its sections
    window.py     parsing windows (`24h`, ISO times, `START/END` baselines)
    plots.py      the SVG figures;  render.py  CSV / JSON / text / HTML
"""

from auditor.reports.report import Report, build_report

__all__ = ["Report", "build_report"]
