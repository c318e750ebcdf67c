"""Per-system rate limiting: a token bucket, as pure arithmetic on a clock
the caller passes in (so it is tested as data, without sleeping)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``burst``."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """Spend one token; return 0 if allowed, else the seconds to wait."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate
