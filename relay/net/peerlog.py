"""What a network peer can make a daemon log, bounded per peer.

Theory of operation
-------------------
A log line is a write (to the journal, to disk): a peer that can make the
relay log once per request, with no token, can fill the disk as surely as
one that could make it write rows to the store.  So every line emitted
while serving a peer's connection is charged to that peer: the listener
sets `PEER` (a context variable, which trio copies into every task the
connection starts: its HTTP/2 reader, its stream handlers) for as long as
it serves the connection, and `PeerLogLimit`, a filter on the daemon's log
handler (`relay.runtime.logs.setup`), lets through a burst of lines per
peer address and then one every few seconds, plus a ceiling for all peers
together (an attacker with many addresses).  The next line let through
from a peer says how many of its lines were dropped meanwhile; each line
carries the peer's address as the ``peer`` field.

Lines emitted outside a peer's context (the uplink, the store, start-up)
are never dropped.  The state is bounded: at most `MAX_PEERS` addresses are
remembered, the least recently seen forgotten first.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from relay.core.ratelimit import TokenBucket

# Per peer address: a burst of this many lines, then one every
# PEER_INTERVAL seconds.  All peers together: ALL_BURST, then ALL_RATE a second.
PEER_BURST = 20
PEER_INTERVAL = 10.0
ALL_BURST = 200
ALL_RATE = 5.0
MAX_PEERS = 1024

PEER: ContextVar[str | None] = ContextVar("relay_peer", default=None)


@contextmanager
def serving(peer: str) -> Iterator[None]:
    """Charge what is logged inside (and in the tasks started inside) to ``peer``."""
    token = PEER.set(peer)
    try:
        yield
    finally:
        PEER.reset(token)


def address_of(stream: object) -> str:
    """The peer's IP address of a trio socket stream (the port changes with
    every connection, so it is left out); ``"?"`` when there is none."""
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "?"
    except (OSError, IndexError, TypeError):
        return "?"


class PeerLogLimit(logging.Filter):
    """The handler filter described in the module docstring; ``clock`` is
    monotonic seconds (a test passes its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._peers: OrderedDict[str, tuple[TokenBucket, int]] = OrderedDict()
        self._all = TokenBucket(ALL_RATE, ALL_BURST)

    def filter(self, record: logging.LogRecord) -> bool:
        peer = PEER.get()
        if peer is None:
            return True
        now = self._clock()
        bucket, dropped = self._peers.pop(peer, (TokenBucket(1 / PEER_INTERVAL, PEER_BURST), 0))
        allowed = bucket.take(now) == 0.0 and self._all.take(now) == 0.0
        self._peers[peer] = (bucket, 0 if allowed else dropped + 1)
        if len(self._peers) > MAX_PEERS:
            self._peers.popitem(last=False)
        if allowed:
            record.peer = peer
            if dropped:
                record.dropped_before = dropped  # this peer's lines not logged since its last one
        return allowed
