"""`auditor report`: the audit report of a time window, from the configured database.

A plain function so the composition root registers it: `app.command("report")(report)` in
auditor/cli/. Reads only the database; never loads the model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from auditor.cli.app import err_console
from auditor.db.engine import database_url, make_engine, session_factory
from auditor.db.models import utcnow
from auditor.errors import InvalidInputError
from auditor.reports.safe_text import visible_controls
from auditor.settings import get_settings


class ReportFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


class CsvSection(str, Enum):
    summary = "summary"
    drift = "drift"
    comparison = "comparison"
    flagged = "flagged"
    series = "series"


class Bucket(str, Enum):
    auto = "auto"
    hour = "hour"
    day = "day"


def _plain(text: object) -> str:
    """Text echoed into a markup line (a window as typed, a concept name, a path): shown as is."""
    return escape(visible_controls(str(text)))


@contextmanager
def _one_line_errors(url: str) -> Iterator[None]:
    """Bad input: one line, exit 2. An unreadable database: one line naming it, exit 1."""
    try:
        yield
    except InvalidInputError as exc:
        err_console.print(f"[bold red]error:[/] {_plain(exc)}")
        raise typer.Exit(2) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        shown = make_url(url).render_as_string(hide_password=True)
        err_console.print(
            f"[bold red]error:[/] cannot read the database {_plain(shown)}: {_plain(reason)} "
            "(is it reachable, and migrated with `auditor migrate`?)"
        )
        raise typer.Exit(1) from None


def _render(built, output_format: ReportFormat, section: CsvSection) -> str:
    from auditor.reports import html, render

    if output_format is ReportFormat.csv:
        return render.to_csv(built, section.value)
    if output_format is ReportFormat.json:
        return render.to_json(built) + "\n"
    if output_format is ReportFormat.html:
        return html.to_html(built)
    return render.to_text(built)


def report(
    since: Annotated[str, typer.Option(help="window start: ISO time, or how long ago (90m, 24h, 7d, 2w)")] = "24h",
    until: Annotated[str, typer.Option(help="window end, exclusive: ISO time, how long ago, or 'now'")] = "now",
    baseline: Annotated[
        str | None,
        typer.Option(
            help="drift baseline: a duration ending at --since (7d), or START/END; "
            "default: the window's own length just before it"
        ),
    ] = None,
    concept: Annotated[
        list[str],
        typer.Option(
            "--concept", "-c", help="concept name (all its versions); repeatable; default: every active or scored one"
        ),
    ] = [],
    output_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="table, csv, json or html")
    ] = ReportFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to this file instead of stdout")] = None,
    top: Annotated[int, typer.Option(min=1, max=1000, help="flagged requests listed per concept version")] = 20,
    bucket: Annotated[
        Bucket, typer.Option(help="time-series bucket; auto = hourly up to 3 days, else daily")
    ] = Bucket.auto,
    table: Annotated[CsvSection, typer.Option(help="the section --format csv writes")] = CsvSection.summary,
) -> None:
    """Audit report for a time window: per-concept scores, flags, drift against a baseline,
    comparison across models and concept versions, top flagged requests (shown only as far as
    each request's privacy mode allows)."""
    from auditor.reports import build_report
    from auditor.reports.window import baseline_window, report_window

    now = utcnow()
    url = database_url(get_settings())
    with _one_line_errors(url):
        window = report_window(since, until, now=now)
        base = baseline_window(baseline, window=window, now=now)
        engine = make_engine(url)
        try:
            with session_factory(engine)() as session:
                result = build_report(
                    session, window.start, window.end, base.start, base.end,
                    concepts=concept or None, top=top, bucket=bucket.value,
                )  # fmt: skip
        finally:
            engine.dispose()
    text = _render(result, output_format, table)
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    err_console.print(f"wrote {_plain(output)}")
