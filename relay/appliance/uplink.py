"""The relay's link to the national hub, wired from its parts.

Theory of operation
-------------------
In the manner of Synapse's federation sender, each part of the link lives
in its own module and owns its state:

* `UplinkConnection` (``uplink_connection.py``): dialling, the checks of
  the hub's certificate, roll-over on new TLS material, redialling with
  backoff; the state the operations tools show.
* `LaneSender` (``lane_sender.py``), one per priority lane: "peek, send,
  then commit", one transaction in flight per lane, a lost answer replayed
  under the same id.
* `ReceiptSender` (``receipt_sender.py``): read receipts.
* `InboxReceiver` (``inbox_receiver.py``): the inbox stream, committed
  before it is acknowledged.

Over each connection `Uplink` runs them side by side: the urgent lane
first, the normal lane once the urgent one has sent what waited for the
connection (or found nothing), the receipts and the inbox at once.
Whatever one of them raises ends the connection, and the others with it
(a request the hub leaves unanswered past ``[uplink] request_timeout``
raises too: see `HubSession`);
their state outlives it, so the next connection picks up where this one
stopped.  `relay.core.routes` is the wire contract they all speak.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable

import trio

from relay.appliance.inbox_receiver import InboxReceiver
from relay.appliance.lane_sender import LaneSender
from relay.appliance.receipt_sender import ReceiptSender
from relay.appliance.uplink_connection import HubSession, Progress, UplinkConnection, UplinkState
from relay.config.model import RelayConfig
from relay.core.priority import NORMAL, URGENT
from relay.net.wakeup import Signal
from relay.store.engine import Store

__all__ = ["Uplink", "UplinkState"]


class Uplink:
    """The relay's one connection to the hub and everything sent and
    received over it.

    ``outbox_changed`` fires when there is something new to send;
    ``on_events`` is told the local systems with new events (messages,
    notices); ``on_delivered(priority, seconds)`` gets the time from
    acceptance here to the destination relay's commit of each message a
    ``delivered`` receipt reports."""

    def __init__(
        self,
        config: RelayConfig,
        store: Store,
        outbox_changed: Signal,
        on_events: Callable[[Iterable[str]], None],
        on_delivered: Callable[[str, float], None],
    ) -> None:
        # Recipients by (what, priority), what being sent, refused,
        # delivered or failed: for the operations tools.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

        def current() -> RelayConfig:
            return self.config

        self._urgent = LaneSender(URGENT, current, store, outbox_changed, on_events, self.counts)
        self._normal = LaneSender(NORMAL, current, store, outbox_changed, on_events, self.counts)
        self._receipts = ReceiptSender(current, store, outbox_changed)
        self._inbox = InboxReceiver(current, store, on_events, on_delivered, self.counts)
        self._connection = UplinkConnection(config, self._serve, on_closing=self._inbox.stop)

    @property
    def config(self) -> RelayConfig:
        """The configuration in force (`swap_config` changes it)."""
        return self._connection.config

    @property
    def state(self) -> UplinkState:
        return self._connection.state

    @property
    def since(self) -> float:
        """When the state last changed (seconds since 1970)."""
        return self._connection.since

    @property
    def last_error(self) -> str | None:
        """Why the last connection failed; None once connected."""
        return self._connection.last_error

    @property
    def attempts(self) -> int:
        """Connections tried since the start, this one included."""
        return self._connection.attempts

    @property
    def changed(self) -> Signal:
        """Fired on every state change."""
        return self._connection.changed

    @property
    def hub_cert_expires(self) -> float | None:
        """When the hub's certificate expires, as seen at the last handshake."""
        return self._connection.hub_cert_expires

    def swap_config(self, config: RelayConfig) -> None:
        """Use ``config`` from now on; see `UplinkConnection.swap_config`
        (raises before anything changes)."""
        self._connection.swap_config(config)

    def retry_now(self) -> None:
        """Cut the wait before the next dial short (``eimis-relay queue retry``)."""
        self._connection.retry_now()

    @property
    def progress(self) -> tuple[Progress, ...]:
        """Whether each kind of request gets answers: urgent, normal,
        receipts, inbox acks, the inbox stream (for the health reports)."""
        return (self._urgent.progress, self._normal.progress, self._receipts.progress, self._inbox.acks,
                self._inbox.stream)

    def stalls(self) -> list[dict]:
        """The lanes making no progress (`Progress.stall`), for the health reports."""
        return [stall for p in self.progress if (stall := p.stall()) is not None]

    def in_flight(self) -> set[str]:
        """Ids of the messages sent to the hub whose answer is not committed
        here yet: purging one of them cannot stop it any more."""
        return self._urgent.in_flight() | self._normal.in_flight()

    async def run(self) -> None:
        """Keep a connection to the hub up, forever."""
        await self._connection.run()

    async def aclose(self) -> None:
        """Graceful stop: end the inbox stream, let a transaction in flight finish."""
        await self._connection.aclose()

    async def _serve(self, session: HubSession) -> None:
        # What waited for the connection goes urgent first: the normal lane
        # starts once the urgent one has sent what it had, or found nothing.
        urgent_sent = trio.Event()
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(functools.partial(
                self._urgent.run, functools.partial(session.post, progress=self._urgent.progress),
                caught_up=urgent_sent))
            nursery.start_soon(functools.partial(
                self._normal.run, functools.partial(session.post, progress=self._normal.progress),
                start=urgent_sent))
            nursery.start_soon(self._receipts.run, functools.partial(session.post, progress=self._receipts.progress))
            nursery.start_soon(self._inbox.run, session)
