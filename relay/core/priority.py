"""The two priorities of a message, and the lanes that carry them.

A priority is a word: what the local API takes and the wire carries.  A
lane is the number both stores file an item under, so that one index on
``(domain, lane, seq)`` serves the queue urgent first (the higher number)
and, within a lane, in arrival order.  The numbers are in stored rows: they
never change.
"""

from __future__ import annotations

PRIORITIES = ("normal", "urgent")

# Lanes; urgent is the higher, for ``ORDER BY lane DESC``.
URGENT, NORMAL = 1, 0


def lane_of(priority: str) -> int:
    return URGENT if priority == "urgent" else NORMAL


def priority_of(lane: int) -> str:
    return "urgent" if lane == URGENT else "normal"
