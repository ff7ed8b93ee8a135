"""Report time windows: half-open [start, end) in UTC, parsed from what a person types.

An instant is an ISO 8601 time (a naive one is read as UTC), `now`, or how long ago: `90m`,
`24h`, `7d`, `2w`. The baseline is a duration (that long, ending where the window starts),
an interval `START/END` of two instants, or by default the window's own length just before it.
Every bound lies between 0001-01-01 and 9999-12-31 UTC (what a datetime holds); one past them
is a WindowError naming its parameter, never an OverflowError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from auditor.errors import InvalidInputError, WindowError

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

BUCKET_SECONDS = {"hour": 3600, "day": 86400}
# Hourly points up to this window length (≤ 72 points per concept); daily beyond it.
HOURLY_UP_TO = timedelta(days=3)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime  # exclusive

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InvalidInputError("window bounds must be timezone-aware datetimes")
        if self.start >= self.end:
            raise InvalidInputError(
                f"window start {self.start.isoformat()} is not before its end {self.end.isoformat()}"
            )

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    def overlaps(self, other: Window) -> bool:
        return self.start < other.end and other.start < self.end


_EARLIEST = "0001-01-01"  # datetime.min: no window or baseline can start before it


def _back(text: str, field: str, what: str = "") -> WindowError:
    return WindowError(field, f"{text!r}{what} reaches back before {_EARLIEST}, the earliest time a report can cover")


def parse_duration(text: str, *, field: str) -> timedelta | None:
    """`24h` -> 24 hours; None when `text` is not a duration. One longer than a timedelta holds
    (999,999,999 days) also reaches back before year 1, so it is refused as such."""
    match = _DURATION.match(text)
    if match is None:
        return None
    try:
        return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise _back(text, field) from None


def _before(instant: datetime, length: timedelta, error: WindowError) -> datetime:
    try:
        return instant - length
    except OverflowError:
        raise error from None


def as_utc(instant: datetime, *, field: str) -> datetime:
    """The instant in UTC, a naive one read as UTC (as a person who typed no zone means it on
    a UTC service). Also the rule for the admin audit log's `since`."""
    if instant.tzinfo is None:
        return instant.replace(tzinfo=UTC)
    try:
        return instant.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0, 9999-12-31T23:00-02:00 in 10000
        raise WindowError(
            field, f"{instant.isoformat()} is outside the times a datetime holds (0001-01-01 to 9999-12-31 UTC)"
        ) from None


def parse_instant(text: str, *, now: datetime, field: str) -> datetime:
    if text.strip().lower() == "now":
        return now
    ago = parse_duration(text, field=field)
    if ago is not None:
        return _before(now, ago, _back(text, field))
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        raise WindowError(field, f"cannot read {text!r}: give an ISO time, 'now', or how long ago (24h, 7d)") from None
    return as_utc(instant, field=field)


def report_window(since: str, until: str, *, now: datetime) -> Window:
    start = parse_instant(since, now=now, field="since")
    end = parse_instant(until, now=now, field="until")
    if start >= end:
        raise WindowError(
            "until",
            f"the window is empty: since {start.isoformat()} is not before until {end.isoformat()}",
        )
    return Window(start, end)


def baseline_window(baseline: str | None, *, window: Window, now: datetime) -> Window:
    if baseline is None or not baseline.strip():
        # Named as `since`: the parameter the caller gave, whose value leaves no room before it.
        too_early = WindowError(
            "since",
            f"{window.start.date().isoformat()} is too early for the default baseline (the window's own "
            f"length just before it would start before {_EARLIEST}): give a baseline or a later since",
        )
        return Window(_before(window.start, window.duration, too_early), window.start)
    length = parse_duration(baseline, field="baseline")
    if length is not None:
        if not length:
            raise WindowError("baseline", "a baseline of length zero holds no scores")
        start = _before(window.start, length, _back(baseline, "baseline", " before since"))
        chosen = Window(start, window.start)
    elif "/" in baseline:
        first, _, second = baseline.partition("/")
        start = parse_instant(first, now=now, field="baseline")
        end = parse_instant(second, now=now, field="baseline")
        if start >= end:
            raise WindowError("baseline", f"{baseline!r} is empty: its start is not before its end")
        chosen = Window(start, end)
    else:
        raise WindowError("baseline", f"cannot read {baseline!r}: give a duration (7d) or an interval START/END")
    check_disjoint(window, chosen)
    return chosen


def check_disjoint(window: Window, baseline: Window) -> None:
    # Shared scores would sit on both sides of the comparison and hide the drift.
    if baseline.overlaps(window):
        raise WindowError(
            "baseline",
            f"[{baseline.start.isoformat()}, {baseline.end.isoformat()}) overlaps the report "
            f"window [{window.start.isoformat()}, {window.end.isoformat()})",
        )


def choose_bucket(bucket: str | None, window: Window) -> str:
    """`hour`, `day`, or None / `auto`: hourly for windows up to HOURLY_UP_TO, else daily."""
    if bucket is None or bucket == "auto":
        return "hour" if window.duration <= HOURLY_UP_TO else "day"
    if bucket not in BUCKET_SECONDS:
        raise WindowError("bucket", f"must be auto, hour or day; got {bucket!r}")
    return bucket
