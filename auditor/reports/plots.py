"""The HTML report's figures, as SVG text to embed inline (no files, no scripts).

Figures are built on `matplotlib.figure.Figure`, never pyplot: pyplot keeps global state that
the API's worker threads would share.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable

import numpy as np
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from auditor.reports.aggregate import SeriesPoint
from auditor.reports.queries import ConceptRef
from auditor.reports.report import Report

BASELINE_COLOUR, RECENT_COLOUR = "tab:blue", "tab:orange"
DISTRIBUTION_COLUMNS = 3
HISTOGRAM_BINS = 30

# ids an SVG defines and how it refers to them: rewritten per figure, because several SVGs in
# one page would otherwise repeat matplotlib's ids (axes_1, glyph and clip-path ids).
_SVG_ID_REFERENCE = re.compile(r'(\bid="|url\(#|href="#)')
_SVG_PROLOGUE = re.compile(r"^.*?(?=<svg\b)", re.DOTALL)


def inline_svg(figure: Figure, plot_id: str) -> str:
    """The figure as an <svg> element for an HTML page: no XML prologue or DOCTYPE, no date,
    and every id prefixed with `plot_id` so ids stay unique across figures."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = _SVG_PROLOGUE.sub("", buffer.getvalue(), count=1)
    return _SVG_ID_REFERENCE.sub(lambda match: f"{match.group(1)}{plot_id}-", svg)


def _by_concept(report: Report) -> dict[int, list[SeriesPoint]]:
    series: dict[int, list[SeriesPoint]] = {ref.concept_id: [] for ref in report.concepts}
    for point in report.series:
        series[point.concept_id].append(point)
    return series


def _over_time(report: Report, value: Callable[[SeriesPoint], float | None], ylabel: str) -> Figure:
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    axes = figure.subplots()
    labels = {ref.concept_id: ref.label for ref in report.concepts}
    drawn = 0
    for concept_id, points in _by_concept(report).items():
        if not points:
            continue
        values = [value(p) for p in points]
        line, = axes.plot(
            [p.bucket_start for p in points], [math.nan if v is None else v for v in values],
            marker="o", markersize=3, linewidth=1.5, label=labels[concept_id],
        )  # fmt: skip
        line.set_gid(f"series-{concept_id}")  # findable in the page: <g id="<plot id>-series-<id>">
        drawn += 1
    axes.set_xlim(report.window.start, report.window.end)
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_ylabel(ylabel)
    axes.set_xlabel(f"UTC, per {report.bucket}")
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(loc="upper left", fontsize="small", ncols=min(drawn, 4))
    else:
        axes.text(0.5, 0.5, "no scores in this window", transform=axes.transAxes, ha="center")
    return figure


def scores_over_time(report: Report) -> Figure:
    figure = _over_time(report, lambda p: p.mean_z, "mean calibrated z")
    figure.axes[0].axhline(0.0, color="grey", linewidth=0.8)
    return figure


def flagged_rate_over_time(report: Report) -> Figure:
    figure = _over_time(report, lambda p: p.flagged_rate, "flagged requests (share)")
    figure.axes[0].set_ylim(bottom=0.0)
    return figure


def _distribution_panel(axes: Axes, ref: ConceptRef, title: str, baseline: np.ndarray, recent: np.ndarray) -> None:
    edges = np.histogram_bin_edges(np.concatenate([baseline, recent]), bins=HISTOGRAM_BINS)
    sides = ((baseline, BASELINE_COLOUR, "baseline"), (recent, RECENT_COLOUR, "recent"))
    for values, colour, name in sides:
        if values.size:
            _, _, outlines = axes.hist(
                values,
                bins=edges,
                density=True,
                histtype="step",
                linewidth=1.5,
                color=colour,
                label=f"{name} (n={values.size})",
            )
            for outline in outlines:
                outline.set_gid(f"{name}-{ref.concept_id}")
    axes.set_title(title, fontsize="medium")
    axes.set_xlabel("raw score (mean cosine)")
    axes.legend(fontsize="x-small")


def score_distribution(report: Report) -> Figure:
    """One panel per concept version with scores in either window: the baseline's raw-score
    histogram against the recent one's (the samples the drift statistics compare)."""
    drift = {row.concept_id: row for row in report.drift}
    samples = {
        ref.concept_id: (report.baseline_scores[ref.concept_id].score,
                         report.recent_scores[ref.concept_id].score)
        for ref in report.concepts
    }  # fmt: skip
    panels = [ref for ref in report.concepts if any(side.size for side in samples[ref.concept_id])]
    rows = max(1, math.ceil(len(panels) / DISTRIBUTION_COLUMNS))
    columns = min(max(1, len(panels)), DISTRIBUTION_COLUMNS)
    figure = Figure(figsize=(3.4 * columns, 2.9 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, ref in zip(grid, panels):
        psi = drift[ref.concept_id].psi
        title = ref.label if psi is None else f"{ref.label} · PSI {psi:.2f}"
        _distribution_panel(axes, ref, title, *samples[ref.concept_id])
    for axes in grid[len(panels) :]:
        axes.set_axis_off()
    if not panels:
        grid[0].text(0.5, 0.5, "no scores in either window", transform=grid[0].transAxes, ha="center")
    return figure


# (element id, caption, figure builder), in page order.
FIGURES: tuple[tuple[str, str, Callable[[Report], Figure]], ...] = (
    ("plot-scores-over-time",
     "Mean calibrated z per bucket, per concept version", scores_over_time),
    ("plot-score-distribution",
     "Raw-score distribution: baseline window against the report window", score_distribution),
    ("plot-flagged-rate",
     "Share of requests flagged per bucket, per concept version", flagged_rate_over_time),
)  # fmt: skip
