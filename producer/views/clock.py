"""How perq writes a time: every view takes its formats from here, so a job's times read alike everywhere.

Times are epoch milliseconds, shown in local time; a time not known yet (a job not finished) shows as `-`.
"""

from __future__ import annotations

from datetime import datetime

DATE_TIME = "%Y-%m-%d %H:%M:%S"  # job lines and headers: `perq status`, `perq log`
SHORT_DATE_TIME = "%m-%d %H:%M:%S"  # table cells of the views kept current, where width is scarce
TIME_OF_DAY = "%H:%M:%S"  # events, which belong to one job and one day


def timestamp(ms: int | None, fmt: str = DATE_TIME) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime(fmt) if ms else "-"


def time_of_day(ms: int) -> str:
    return timestamp(ms, TIME_OF_DAY)


def now() -> str:
    """The time of day now, for a view's title."""
    return datetime.now().strftime(TIME_OF_DAY)
