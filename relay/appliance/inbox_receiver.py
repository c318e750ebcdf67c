"""The relay's side of the inbox stream: take what the hub sends, then
acknowledge it.

Theory of operation
-------------------
A long-lived ``GET /v1/inbox`` stream brings envelopes and receipts.
Whatever has arrived is committed in one unit, and only then are its
positions acknowledged; a crash in between means the hub sends them again
and the inbound table's unique key drops the copies.  Acks go out without
stopping the stream: while one is on its way, what arrived meanwhile is
being committed.

Above the store's size ceiling, the receiver stops taking items (the hub
keeps them meanwhile) and HTTP/2 flow control pushes back on the hub; it
looks at the store again every `ROOM_POLL` seconds.

The hub never ends the stream by itself: the receiver raises when it ends
or breaks (and the connection is given up), and `stop` resets it for a
graceful close.

Deadlines (``[uplink] request_timeout``): the hub must answer the inbox
request (its headers) and each ack in time, or the connection is given up
(`HubTimeout`) and the hub sends the unacknowledged items again on the
next one.  The stream itself is long-lived and may rightly stay quiet for
hours: a dead connection under it is found by the PINGs, and a hub that
holds items back on a live stream cannot be seen from here at all
(docs/operations.md, "Health").  A stall of the acks ends once the hub
answers one, or once the stream has been quiet for ``request_timeout``
with no ack outstanding: nothing is left to acknowledge then.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable

import trio

from relay.appliance.uplink_connection import HubSession, HubTimeout, Progress
from relay.config.model import RelayConfig
from relay.core import protocol, routes
from relay.core.h2session import ConnectionClosed, status_of
from relay.core.protocol import InboxItem
from relay.net.h2connection import H2Stream
from relay.store import relay_inbox, relay_queue
from relay.store.engine import Store

log = logging.getLogger(__name__)

# Inbox items committed in one unit at most.
INBOUND_BATCH = 500
# Acks on their way to the hub at once, while the inbox stream goes on.
ACKS_MAX = 4
# How often a full store is looked at again.
ROOM_POLL = 1.0


class InboxReceiver:
    """See the module docstring.

    ``config`` returns the configuration in force; ``on_events`` is told
    the local systems with new events; ``on_delivered(priority, seconds)``
    gets the latency of each message sent from here that a ``delivered``
    receipt reports; ``counts`` (shared with the rest of the uplink) counts
    recipients by (``"delivered"`` or ``"failed"``, priority)."""

    def __init__(self, config: Callable[[], RelayConfig], store: Store, on_events: Callable[[Iterable[str]], None],
                 on_delivered: Callable[[str, float], None], counts: collections.Counter[tuple[str, str]]) -> None:
        self._config = config
        self._store = store
        self._on_events = on_events
        self._on_delivered = on_delivered
        self._counts = counts
        self._scope = trio.CancelScope()
        self._stream: H2Stream | None = None
        # Whether the hub answers the acks, and the inbox request.
        self.acks = Progress("acks", "the inbox acknowledgements")
        self.stream = Progress("inbox", "the inbox stream")
        self._acks_out = 0

    def stop(self) -> None:
        """End the inbox stream now, for a graceful close: reset at once, so
        that the RST goes out before the GOAWAY."""
        self._scope.cancel()
        if self._stream is not None:
            self._stream.reset()

    async def run(self, session: HubSession) -> None:
        """Take the inbox stream of ``session`` until it breaks (raises) or `stop`."""
        self._scope = trio.CancelScope()
        with self._scope:
            stream = session.open_inbox()
            self._stream = stream
            try:
                await self._consume(session, stream)
            finally:
                self._stream = None
                stream.reset()

    async def _consume(self, session: HubSession, stream: H2Stream) -> None:
        with trio.move_on_after(session.timeout) as deadline:
            headers = await stream.receive_headers()
        if deadline.cancelled_caught:
            self.stream.timed_out(f"GET {routes.PATH_INBOX}")
            raise HubTimeout(f"the hub did not answer GET {routes.PATH_INBOX} within {session.timeout:g} s")
        routes.check_inbox_status(status_of(headers))
        self.stream.moving()
        decoder = routes.InboxDecoder()
        slots = trio.Semaphore(ACKS_MAX)
        async with trio.open_nursery(strict_exception_groups=True) as acks:
            while True:
                # Quiet is normal here; quiet with no ack outstanding means
                # that nothing is left to acknowledge.
                with trio.move_on_after(session.timeout) as quiet:
                    data = await stream.receive_some()
                if quiet.cancelled_caught:
                    if not self._acks_out:
                        self.acks.moving()
                    continue
                if not data:
                    raise ConnectionClosed("the hub ended the inbox stream")
                items = decoder.feed(data)
                for start in range(0, len(items), INBOUND_BATCH):
                    chunk = items[start:start + INBOUND_BATCH]
                    failures = await self._take(chunk)
                    await slots.acquire()
                    acks.start_soon(self._ack, session, [item.seq for item in chunk], failures, slots)

    async def _take(self, items: list[InboxItem]) -> list[protocol.Failure]:
        """Commit what the hub sent; return the failures its ack reports."""
        await self._wait_for_room()
        config = self._config()
        receipts = [item.receipt for item in items if item.receipt is not None]

        def systems_serving(address: str) -> list[str]:
            return [system.name for system in config.systems_serving(address)]

        now = time.time()

        def take(db: sqlite3.Connection) -> tuple:
            facts = relay_queue.delivery_facts(db, (r.id for r in receipts))
            return relay_inbox.take_inbound(db, config.domain, items, systems_serving, now=now), facts

        urgent = any(item.envelope is not None and item.envelope.priority == "urgent" for item in items)
        (failures, woken), facts = await self._store.run("take_inbound", take, urgent=urgent)
        self._count_receipts(receipts, facts)
        self._on_events(woken)
        return failures

    async def _ack(self, session: HubSession, seqs: list[int], failures: list[protocol.Failure],
                   slots: trio.Semaphore) -> None:
        """Acknowledge committed positions, while the stream goes on: a lost
        ack only means the hub sends them again, and they are dropped here."""
        self._acks_out += 1
        try:
            await session.post(routes.ack(seqs, failures), self.acks)
        finally:
            self._acks_out -= 1
            slots.release()

    async def _wait_for_room(self) -> None:
        """Above the store's ceiling, stop taking from the hub (which keeps
        the messages meanwhile); HTTP/2 flow control pushes back on it."""
        ceiling = self._config().store.max_bytes
        if self._store.used_bytes > ceiling:
            log.warning("store above its ceiling (%d bytes): not taking messages from the hub", ceiling)
            while self._store.used_bytes > ceiling:  # noqa: ASYNC110 -- no event: the writer thread sets it
                await trio.sleep(ROOM_POLL)
            log.info("store below its ceiling again: taking messages from the hub")

    def _count_receipts(self, receipts: list[protocol.Receipt], facts: dict[str, tuple[str, float]]) -> None:
        """Delivery counters and latency (acceptance here to the destination
        relay's commit), for the receipts about messages sent from here."""
        now = time.time()
        for receipt in receipts:
            if receipt.id not in facts or receipt.status not in ("delivered", "failed"):
                continue
            priority, accepted_at = facts[receipt.id]
            self._counts[receipt.status, priority] += len(receipt.rcpt)
            if receipt.status == "delivered":
                self._on_delivered(priority, now - accepted_at)
