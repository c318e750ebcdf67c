"""The formats times are written in (relay.core.timeformat): each as its reader expects it."""

from datetime import datetime, timedelta, timezone

from relay.core import timeformat

MOMENT = 1_772_353_800.25  # 2026-03-01 08:30:00.25 UTC


def test_iso_is_utc_with_milliseconds():
    assert timeformat.iso(MOMENT) == "2026-03-01T08:30:00.250Z"
    assert timeformat.iso(0) == "1970-01-01T00:00:00.000Z"
    assert timeformat.iso(MOMENT + 0.9999) == "2026-03-01T08:30:01.249Z"  # truncated, never rounded up


def test_readable_formats():
    assert timeformat.minute(MOMENT) == "2026-03-01 08:30 UTC"
    assert timeformat.second(MOMENT) == "2026-03-01 08:30:00 UTC"
    assert timeformat.day(MOMENT) == "2026-03-01"
    assert timeformat.compact(MOMENT) == "20260301T083000Z"


def test_an_aware_datetime_is_written_in_utc():
    paris = datetime(2026, 3, 1, 9, 30, 0, 250000, tzinfo=timezone(timedelta(hours=1)))
    assert timeformat.minute(paris) == "2026-03-01 08:30 UTC"
    assert timeformat.iso(paris) == "2026-03-01T08:30:00.250Z"
