"""One priority lane of the outbox on its way to the hub: "peek, send, then
commit".

Theory of operation
-------------------
The lane's next batch is read from the outbox, not removed; it goes out as
one transaction with a fresh id; the hub's per-envelope answers are
committed, and only that commit takes the envelopes out of the outbox.
Each lane (urgent, normal) has one `LaneSender` and one transaction in
flight at a time, which keeps each lane's order simple to reason about,
and lets an urgent transaction pass a normal one on the wire; on a new
connection the urgent lane goes first (`Uplink` starts the normal lane
once the urgent one has caught up).

The store work is overlapped with the hub's: the next batch is read while
a transaction is in flight (read ahead), and an answer is committed while
the next transaction is already out (settling).  An envelope whose answer
is not committed yet is left out of the next reads; were that commit lost,
the envelope would simply go again and the hub would recognise it.

A transaction whose answer was lost (connection drop, cancel, or no
answer within ``[uplink] request_timeout``, which gives the connection up)
stays *pending*: it is kept in memory, across connections, and replayed with the
same id before anything newer, and the hub answers it from its record.  If
the relay itself died, the envelopes go again under a new id and the hub's
duplicate filter drops them.

The sender owns that state (pending, settling, read ahead); `in_flight`
tells the operations tools which messages are past stopping.
"""

from __future__ import annotations

import collections
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

import trio

from relay.appliance.uplink_connection import Progress
from relay.config.model import RelayConfig
from relay.core import protocol, routes
from relay.core.priority import priority_of
from relay.net.wakeup import Signal
from relay.store import relay_queue
from relay.store.engine import Store

log = logging.getLogger(__name__)

# Answered transactions of a lane whose answer may be committing here at
# once: the store commits them in the background, this bounds how far behind.
SETTLING_MAX = 2

Batch = list[tuple[int, protocol.Envelope]]
Post = Callable[[routes.Request], Awaitable[bytes]]


class LaneSender:
    """The transactions of one outbox lane (`URGENT` or
    `NORMAL`); see the module docstring.

    ``config`` returns the configuration in force (it may be reloaded);
    ``on_events`` is told the local systems notified of a refusal;
    ``counts`` (shared with the rest of the uplink) counts recipients by
    (``"sent"`` or ``"refused"``, priority)."""

    def __init__(self, lane: int, config: Callable[[], RelayConfig], store: Store, outbox_changed: Signal,
                 on_events: Callable[[Iterable[str]], None], counts: collections.Counter[tuple[str, str]]) -> None:
        self.lane = lane
        self._config = config
        self._store = store
        self._outbox_changed = outbox_changed
        self._on_events = on_events
        self._counts = counts
        name = priority_of(lane)
        # Whether the hub answers the lane's transactions (`HubSession.post`).
        self.progress = Progress(name, f"the {name} lane")
        # The transaction sent and not answered yet: replayed with the same
        # id, before anything newer, if its answer is lost.
        self._pending: tuple[str, Batch] | None = None
        # The outbox positions the hub has taken whose answer is not
        # committed here yet (message id by position).
        self._settling: dict[int, str] = {}
        # The batch read ahead to go next, on the current connection.
        self._ahead: Batch = []

    def in_flight(self) -> set[str]:
        """Ids of the lane's messages sent (or about to be sent without
        another look at the store) whose answer is not committed here yet."""
        batches = [self._ahead, *([self._pending[1]] if self._pending is not None else [])]
        return {envelope.id for batch in batches for _, envelope in batch} | set(self._settling.values())

    async def run(self, post: Post, *, start: trio.Event | None = None, caught_up: trio.Event | None = None) -> None:
        """Send the lane's transactions with ``post``, one at a time, until
        ``post`` raises (the connection is lost); what is pending then is
        replayed by the next `run`.

        ``start``: wait for it before the first transaction.  ``caught_up``:
        set once the lane has found nothing to send, or got an answer."""
        slots = trio.Semaphore(SETTLING_MAX)
        self._ahead = []
        if start is not None:
            await start.wait()
        async with trio.open_nursery(strict_exception_groups=True) as settling:
            while True:
                changed = self._outbox_changed.watch()
                if self._pending is None:
                    full = len(self._ahead) == self._config().uplink.batch_max
                    batch, self._ahead = self._ahead, []
                    if not full:
                        batch = await self._next_batch()
                    if not batch:
                        if caught_up is not None:
                            caught_up.set()
                        await changed.wait()
                        continue
                    self._pending = (secrets.token_urlsafe(16), batch)
                txn_id, batch = self._pending
                async with trio.open_nursery(strict_exception_groups=True) as exchange:
                    exchange.start_soon(self._read_ahead, batch)
                    body = await post(routes.transaction(txn_id, [envelope for _, envelope in batch]))
                outcomes = protocol.decode_outcomes(body, len(batch))
                if caught_up is not None:
                    caught_up.set()
                # A cancel while waiting for a slot leaves the transaction
                # pending: replayed under its id, answered from the hub's record.
                await slots.acquire()
                self._pending = None
                self._settling.update((seq, envelope.id) for seq, envelope in batch)
                settling.start_soon(self._settle,
                                    [(seq, env, o) for (seq, env), o in zip(batch, outcomes, strict=True)], slots)

    async def _next_batch(self, sent: Iterable[tuple[int, protocol.Envelope]] = ()) -> Batch:
        """The lane's next batch, past the envelopes ``sent`` and those settling."""
        config = self._config()
        domain, limit, lane = config.domain, config.uplink.batch_max, self.lane
        after = max((*self._settling, *(seq for seq, _ in sent)), default=0)
        while True:
            now = time.time()
            found = await self._store.read("next_batch", functools.partial(
                relay_queue.next_batch, domain=domain, limit=limit, now=now, lane=lane, after=after))
            if not found.damaged:
                return found.envelopes
            # Rows that cannot be read are failed (their senders told), never sent nor left to block the lane.
            fail = functools.partial(relay_queue.fail_damaged, damaged=found.damaged, now=now)
            notified = await self._store.run("fail_damaged", fail)
            self._on_events(notified)
            if found.envelopes:
                return found.envelopes

    async def _read_ahead(self, sent: Batch) -> None:
        """Read the batch after ``sent``.  Only a full one is used as is: a
        partial one is read again, since more may have come."""
        self._ahead = await self._next_batch(sent)

    async def _settle(self, results: list[tuple[int, protocol.Envelope, protocol.Outcome]],
                      slots: trio.Semaphore) -> None:
        """Commit the hub's answer to a transaction: the envelopes leave the outbox."""
        try:
            now = time.time()
            notified = await self._store.run("apply_outcomes",
                                             lambda c: relay_queue.apply_outcomes(c, results, now=now))
        finally:
            for seq, _, _ in results:
                self._settling.pop(seq, None)
            slots.release()
        self._on_events(notified)
        for _, env, outcome in results:
            self._counts["sent" if outcome.accepted else "refused", env.priority] += len(env.rcpt)
            if not outcome.accepted:
                log.warning("hub refused message %s for %s: %s", env.id, env.dest, outcome.reason,
                            extra={"message_id": env.id})
