"""The hub's own bounds on connections: how many it holds, how many per
relay domain, how many TLS handshakes at once.

Theory of operation
-------------------
Every TCP connection the hub accepts gets a `Ticket` before anything else
is done with it, and is in one of two states:

* *shaking hands*: not authenticated yet.  These are the cheap ones for
  anybody on the Internet to make, so they are the ones to give up: when
  ``max_handshakes`` are in progress, or the hub holds ``max_connections``,
  a new connection evicts the oldest handshake (its task is cancelled and
  the socket closed).  A crowd of slow or silent handshakers can therefore
  slow honest relays down by at most one handshake's time, never lock them
  out; and each handshake ends within ``handshake_timeout`` anyway.
* *authenticated*: the certificate named a registered domain.  A domain
  holds at most ``max_connections_per_domain`` of them (a relay needs one;
  a few more cover a roll-over to a new certificate, `doctor`, and a dead
  connection not yet detected by keepalive).  Authenticated connections are
  never evicted: when the hub holds ``max_connections`` of them, a new
  connection is refused at once.

The counts are kept here, in plain data, and changed only by the calls
below, each synchronous: the trio shell (`relay.hub.server`) does the I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import trio


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_domain: int
    max_handshakes: int


@dataclass(eq=False)
class Ticket:
    """One accepted connection.  ``scope`` is what eviction cancels."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    domain: str | None = None  # set once authenticated
    evicted: bool = False


class Gate:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._shaking: OrderedDict[Ticket, None] = OrderedDict()  # oldest first
        self._authenticated = 0
        self.per_domain: dict[str, int] = {}
        self.evictions = 0

    @property
    def connections(self) -> int:
        return len(self._shaking) + self._authenticated

    @property
    def handshakes(self) -> int:
        return len(self._shaking)

    @property
    def authenticated(self) -> int:
        return self._authenticated

    def enter(self) -> Ticket | None:
        """A TCP connection was accepted: its ticket, or None when the hub
        holds ``max_connections`` authenticated connections already."""
        limits = self.limits
        while self._shaking and (len(self._shaking) >= limits.max_handshakes
                                 or self.connections >= limits.max_connections):
            self._evict_oldest()
        if self.connections >= limits.max_connections:
            return None
        ticket = Ticket()
        self._shaking[ticket] = None
        return ticket

    def authenticate(self, ticket: Ticket, domain: str) -> bool:
        """The handshake of ``ticket`` named ``domain``: True when it may
        have one more connection (the ticket then counts as one of them)."""
        if ticket.evicted:
            return False
        if self.per_domain.get(domain, 0) >= self.limits.max_connections_per_domain:
            return False
        del self._shaking[ticket]
        ticket.domain = domain
        self._authenticated += 1
        self.per_domain[domain] = self.per_domain.get(domain, 0) + 1
        return True

    def leave(self, ticket: Ticket) -> None:
        """The connection of ``ticket`` is closed (once per ticket)."""
        if ticket.domain is not None:
            self._authenticated -= 1
            left = self.per_domain[ticket.domain] - 1
            if left:
                self.per_domain[ticket.domain] = left
            else:
                del self.per_domain[ticket.domain]
            ticket.domain = None
        elif not ticket.evicted:
            del self._shaking[ticket]

    def close_handshakes(self) -> None:
        """Shutdown: every handshake in progress ends now."""
        while self._shaking:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        ticket, _ = self._shaking.popitem(last=False)
        ticket.evicted = True
        ticket.scope.cancel()
        self.evictions += 1
