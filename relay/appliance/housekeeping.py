"""The relay's clock-driven duties: expiry, delay notices, retention.

Nothing here is urgent to the second, so one task wakes up periodically
and runs each duty as its own unit of work.  The period follows the
configured limits, so that a short ``delay_warning`` (a test's, say) is
honoured promptly and a week-long one costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import trio

from relay.config.model import Delivery
from relay.store import audit, relay_inbox, relay_queue
from relay.store.engine import Store

log = logging.getLogger(__name__)

MAX_PERIOD = 10.0
MIN_PERIOD = 0.1


def period(delivery: Delivery) -> float:
    return max(MIN_PERIOD, min(MAX_PERIOD, delivery.delay_warning / 4, delivery.message_ttl / 4))


class Housekeeping:
    """``clock`` is the wall clock the duties compare stored times with;
    the period between ticks is trio's, so a test's clock drives both."""

    def __init__(self, store: Store, delivery: Delivery, on_events: Callable[[Iterable[str]], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.delivery = delivery
        self._on_events = on_events
        self.expired = 0
        self.delayed = 0

    async def run(self) -> None:
        while True:
            await self.tick(self.clock())
            await trio.sleep(period(self.delivery))

    async def tick(self, now: float) -> None:
        notified: set[str] = set()
        expired = await self.store.run_patiently("expire", lambda c: relay_queue.expire(c, now, notified))
        if expired:
            log.warning("%d recipient(s) failed: message time-to-live ran out before the hub took them", expired)
        delayed = await self.store.run_patiently(
            "notice_delays", lambda c: relay_queue.notice_delays(c, now, self.delivery.delay_warning)
        )
        window = self.delivery.retry_window
        await self.store.run_patiently("drop_bodies", lambda c: relay_queue.drop_bodies(c, now, window))
        retention = self.delivery.event_retention
        pruned = await self.store.run_patiently("prune_events", lambda c: relay_inbox.prune(c, now, retention))
        if pruned:
            log.info("dropped %d event(s) older than the retention period", pruned)
        forgotten = await self.store.run_patiently("prune_messages", lambda c: relay_queue.prune(c, now, retention))
        if forgotten:
            log.info("forgot %d sent message(s) older than the retention period", forgotten)
        audited = await self.store.run_patiently(
            "prune_audit", lambda c: audit.prune(c, now, self.delivery.audit_retention))
        if audited:
            log.info("dropped %d audit entries older than the retention period", audited)
        self.expired += expired
        self.delayed += len(delayed)
        self._on_events(notified | delayed)
