"""Summaries: the median of several runs and how far apart the runs were.

The median, not the mean: one run disturbed by a neighbour on a shared VM
moves a mean, not a median.  The spread is ``(max - min) / median``, the
honest "how much to trust this" figure for three to five runs.
"""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    """``{"median", "min", "max", "spread", "runs"}`` of one figure's runs
    (no spread for a single run: it would read as a perfect ±0%)."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread": None, "runs": []}
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median and len(values) > 1 else None
    return {"median": median, "min": min(values), "max": max(values), "spread": spread,
            "runs": [round(v, 4) for v in values]}


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def median_of(figure: dict | None) -> float | None:
    return figure.get("median") if figure else None
