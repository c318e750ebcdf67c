"""Moments in words: every format the relay writes a time in, in one place.

Each format has its reader, and so its reason:

* `iso`: ISO 8601 in UTC with milliseconds (``2026-03-01T08:30:00.250Z``),
  for programs: the local API's documents and the log lines;
* `minute` and `second` (``2026-03-01 08:30 UTC``), for people: a
  certificate's dates to the minute, status and audit reports to the
  second;
* `day` (``2026-03-01``), when only the date matters;
* `compact` (``20260301T083000Z``), for file names: no spaces or colons;
* `span`, a duration for people (``3.2 h``), in status reports.

All are UTC: a hospital's systems and the hub may sit in different zones,
and a log collector needs no zone to compare two lines.  A moment is a Unix
time in seconds or a timezone-aware `datetime`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def span(seconds: float) -> str:
    """A duration as an admin reads it: "3.2 h", "45 s"."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def iso(moment: float | datetime) -> str:
    seconds = _seconds(moment)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def minute(moment: float | datetime) -> str:
    return f"{_utc(moment):%Y-%m-%d %H:%M} UTC"


def second(moment: float | datetime) -> str:
    return f"{_utc(moment):%Y-%m-%d %H:%M:%S} UTC"


def day(moment: float | datetime) -> str:
    return f"{_utc(moment):%Y-%m-%d}"


def compact(moment: float | datetime) -> str:
    return f"{_utc(moment):%Y%m%dT%H%M%SZ}"


def _seconds(moment: float | datetime) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else moment


def _utc(moment: float | datetime) -> datetime:
    if isinstance(moment, datetime):
        return moment.astimezone(UTC)
    return datetime.fromtimestamp(moment, UTC)
