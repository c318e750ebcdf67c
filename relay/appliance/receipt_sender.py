"""Read receipts on their way to the hub (``POST /v1/receipts``).

A local system reported a message read; the receipt waits in the store
until the hub has answered it, whatever the answer.  Receipts are
idempotent (a second ``read`` changes nothing at the origin), so an answer
lost to a broken connection (or not given within ``[uplink]
request_timeout``, which gives the connection up) just means sending them
again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from relay.appliance.uplink_connection import Progress
from relay.config.model import RelayConfig
from relay.core import protocol, routes
from relay.net.wakeup import Signal
from relay.store import relay_queue
from relay.store.engine import Store

log = logging.getLogger(__name__)

# Receipts per request: the most the hub takes in one (`protocol.MAX_BATCH`).
RECEIPTS_PER_REQUEST = 500


class ReceiptSender:
    def __init__(self, config: Callable[[], RelayConfig], store: Store, outbox_changed: Signal) -> None:
        self._config = config
        self._store = store
        self._outbox_changed = outbox_changed
        # Whether the hub answers them (`HubSession.post`).
        self.progress = Progress("receipts", "the read receipts")

    async def run(self, post: Callable[[routes.Request], Awaitable[bytes]]) -> None:
        """Send pending read receipts with ``post`` until it raises."""
        domain = self._config().domain
        while True:
            changed = self._outbox_changed.watch()
            pending = await self._store.read(
                "next_receipts", lambda c: relay_queue.next_receipts(c, domain, RECEIPTS_PER_REQUEST))
            if not pending:
                await changed.wait()
                continue
            body = await post(routes.receipts([r for _, r in pending]))
            outcomes = protocol.decode_outcomes(body, len(pending))
            await self._store.run("drop_receipts",
                                  lambda c: relay_queue.drop_receipts(c, [seq for seq, _ in pending]))  # noqa: B023 -- run() awaits it
            for (_, receipt), outcome in zip(pending, outcomes, strict=True):
                if not outcome.accepted:
                    log.warning("hub refused the read receipt of message %s: %s", receipt.id, outcome.reason)
