"""Reconnection delays: exponential backoff with jitter.

Pure policy, no clock and no sleeping, so the sequence is testable as data.
Jitter ("equal jitter": half fixed, half random) keeps hundreds of relays
that lost the hub at the same moment from all knocking again in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    initial: float
    maximum: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 32))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
