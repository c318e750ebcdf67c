"""The relay's one connection to the national hub.

Theory of operation
-------------------
`Uplink.run` dials the hub (directly or through a CONNECT proxy), checks
the hub's certificate and name, and runs two loops over the one HTTP/2
connection until it breaks; then it waits (`RetryPolicy`) and dials again.

*Sending* ("peek, send, then commit"): the next batch is read from the
outbox, not removed; it goes out as one transaction with a fresh id; the
hub's per-envelope answers are committed, and only that commit takes the
envelopes out of the outbox.  Each lane (urgent, normal) has one
transaction in flight at a time, which keeps each lane's order simple to
reason about, and lets an urgent transaction pass a normal one on the
wire; on a new connection the urgent lane goes first.  The store work is overlapped with the hub's: the next batch is read
while a transaction is in flight, and an answer is committed while the
next transaction is already out.  A transaction whose answer was lost
(connection drop, cancel) is kept in memory and replayed with the same id
on the next connection, and the hub answers it from its record; if the
relay itself died, the envelopes go again under a new id and the hub's
duplicate filter drops them.

*Receiving*: a long-lived ``GET /v1/inbox`` stream brings envelopes and
receipts.  Whatever has arrived is committed in one unit, and only then are
its positions acknowledged; a crash in between means the hub sends them
again and the inbound table's unique key drops the copies.  Acks go out
without stopping the stream: while one is on its way, what arrived
meanwhile is being committed.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import secrets
import sqlite3
import ssl
import time
from typing import Callable, Iterable

import trio

from relay.config.model import RelayConfig
from relay.core import protocol
from relay.core.backoff import RetryPolicy
from relay.core.protocol import InboxItem, ProtocolViolation
from relay.net.h2connection import ConnectionClosed, H2Stream, Http2Connection, Http2Settings, StreamReset, status_of
from relay.net.proxy import open_tunnel
from relay.net.revocation import RevocationList, Revoked
from relay.net.tls import relay_client_context
from relay.net.wakeup import Signal
from relay.pki.identity import peer_identity
from relay.store import relay_inbox, relay_queue
from relay.store.engine import Store, StoreUnavailable

log = logging.getLogger(__name__)

# A connection that stayed up this long resets the backoff: the hub is fine.
STABLE_AFTER = 30.0
# Inbox items committed in one unit at most.
INBOUND_BATCH = 500
ANSWER_LIMIT = 4 * 1024 * 1024
# Acks on their way to the hub at once, while the inbox stream goes on.
ACKS_MAX = 4
# Answered transactions of a lane whose answer may be committing here at
# once: the store commits them in the background, this bounds how far behind.
SETTLING_MAX = 2
# How often a full store is looked at again.
ROOM_POLL = 1.0


class UplinkState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DOWN = "down"


class UplinkError(Exception):
    """The hub answered something this relay cannot go on with."""


class Uplink:
    def __init__(
        self,
        config: RelayConfig,
        store: Store,
        outbox_changed: Signal,
        on_events: Callable[[Iterable[str]], None],
    ) -> None:
        self.config = config
        self.store = store
        self.outbox_changed = outbox_changed
        self._on_events = on_events
        self._ssl, self._revocation = _national_tls(config)
        self._tls_stamp = _tls_stamp(config)
        self._policy = RetryPolicy(config.uplink.backoff_initial, config.uplink.backoff_max)
        # Per lane, the transaction sent and not answered yet: replayed
        # with the same id, before anything newer, if its answer is lost.
        self._pending: dict[int, tuple[str, list[tuple[int, protocol.Envelope]]]] = {}
        # Per lane, the outbox positions the hub has taken whose answer is
        # not committed here yet (message id by position), and the batch
        # read ahead to go next.
        self._settling: dict[int, dict[int, str]] = {relay_queue.URGENT: {}, relay_queue.NORMAL: {}}
        self._ahead: dict[int, list[tuple[int, protocol.Envelope]]] = {}
        self.state = UplinkState.CONNECTING
        self.since = time.time()
        self.last_error: str | None = None
        self.attempts = 0
        self._conn: Http2Connection | None = None
        self._receiver_scope = trio.CancelScope()
        self._inbox: H2Stream | None = None
        self._nursery: trio.Nursery | None = None
        # For the operations tools: fired on every state change; recipients
        # by (what, priority), what being sent, refused, delivered or failed;
        # when the hub's certificate expires (seen at the last handshake).
        self.changed = Signal()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.hub_cert_expires: float | None = None
        self.on_delivered: Callable[[str, float], None] = lambda priority, seconds: None
        self._dial_now = trio.Event()
        self._rolling_over = False

    def _set_state(self, state: UplinkState) -> None:
        if state is not self.state:
            self.state, self.since = state, time.time()
            self.changed.fire()

    def swap_config(self, config: RelayConfig) -> None:
        """Use ``config`` from now on (SIGHUP, or a renewed certificate on disk).

        Raises what loading its TLS files raises (`ssl.SSLError`, `OSError`,
        `ValueError`) before anything changes.  When the certificate, key,
        CA, CRLs or the way to the hub changed, the connection rolls over:
        the inbox stream ends, a transaction in flight gets its answer, and
        the relay dials again at once with the new material.  Nothing queued
        is touched: the outbox is in the store, the inbox resumes at the
        hub's last acknowledged item."""
        tls, revocation = _national_tls(config)
        stamp = _tls_stamp(config)
        self.config, self._ssl, self._revocation = config, tls, revocation
        self._policy = RetryPolicy(config.uplink.backoff_initial, config.uplink.backoff_max)
        if stamp != self._tls_stamp:
            self._tls_stamp = stamp
            if self._conn is not None and self._nursery is not None:
                self._rolling_over = True
                self._nursery.start_soon(self._roll_over)
            else:
                self.retry_now()

    async def _roll_over(self) -> None:
        await self.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def retry_now(self) -> None:
        """Cut the wait before the next dial short (``eimis-relay queue retry``)."""
        if self._conn is None:
            self._dial_now.set()

    def in_flight(self) -> set[str]:
        """Ids of the messages sent to the hub whose answer is not committed
        here yet: purging one of them cannot stop it any more."""
        batches = [*self._pending.values(), *(("", batch) for batch in self._ahead.values())]
        return {envelope.id for _, batch in batches for _, envelope in batch} | {
            ident for settling in self._settling.values() for ident in settling.values()}

    async def run(self) -> None:
        """Keep a connection to the hub up, forever."""
        failures = 0
        while True:
            self._set_state(UplinkState.CONNECTING)
            self.attempts += 1
            started = trio.current_time()
            try:
                await self._connect_and_serve()
            except* (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError, ConnectionClosed,
                     StreamReset, ProtocolViolation, UplinkError, Revoked, StoreUnavailable) as group:
                if not self._rolling_over:
                    # Each task on the connection may fail of the same cause: say it once.
                    self.last_error = "; ".join(dict.fromkeys(_describe(e) for e in _leaves(group)))
                    log.warning("uplink to %s: %s", self.config.uplink.hub_url, self.last_error)
            self._conn = self._nursery = None
            if self._rolling_over:
                self._rolling_over = False
                log.info("uplink: reconnecting with the new certificate and settings")
                continue
            self._set_state(UplinkState.DOWN)
            failures = 0 if trio.current_time() - started > STABLE_AFTER else failures + 1
            delay = self._policy.delay(failures - 1 if failures else 0)
            log.info("uplink: reconnecting in %.1f s", delay)
            with trio.move_on_after(delay):
                await self._dial_now.wait()
            self._dial_now = trio.Event()

    async def _connect_and_serve(self) -> None:
        up = self.config.uplink
        with trio.fail_after(up.connect_timeout):
            if up.proxy is not None:
                tcp = await open_tunnel(up.proxy, up.hub_host, up.hub_port)
            else:
                tcp = await trio.open_tcp_stream(up.hub_host, up.hub_port)
            tls = trio.SSLStream(tcp, self._ssl, server_hostname=up.server_name)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
        try:
            self._check_hub(tls)
        except (UplinkError, Revoked):
            await trio.aclose_forcefully(tls)
            raise
        self.hub_cert_expires = peer_identity(tls.getpeercert(binary_form=True)).not_after.timestamp()
        settings = Http2Settings(keepalive_interval=up.keepalive_interval, keepalive_timeout=up.keepalive_timeout)
        conn = Http2Connection(tls, client=True, settings=settings, name=f"hub {up.server_name}")
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            await nursery.start(conn.run)
            self._conn, self._nursery = conn, nursery
            self._set_state(UplinkState.CONNECTED)
            self.last_error = None
            log.info("uplink connected to %s", up.hub_url)
            nursery.start_soon(self._sender, conn)
            nursery.start_soon(self._receiver, conn)
        raise ConnectionClosed("connection to the hub ended")

    def _check_hub(self, tls: trio.SSLStream) -> None:
        """What the handshake does not check: ALPN, revocation, organisation."""
        if tls.selected_alpn_protocol() != protocol.ALPN:
            raise UplinkError("the hub did not negotiate HTTP/2 (ALPN h2)")
        der = tls.getpeercert(binary_form=True)
        self._revocation.check(der)
        allowed = self.config.uplink.hub_org_ids
        org = peer_identity(der).org_id
        if allowed and org not in allowed:
            raise UplinkError(f"the hub's certificate is of organisation {org or '(none)'}, "
                              f"not one of hub_org_ids ({', '.join(sorted(allowed))})")

    async def aclose(self) -> None:
        """Graceful stop: end the inbox stream, let a transaction in flight finish."""
        self._receiver_scope.cancel()
        if self._inbox is not None:
            self._inbox.reset()  # now, so that the RST goes out before the GOAWAY
        if self._conn is not None:
            await self._conn.aclose_gracefully()

    # -- sending ---------------------------------------------------------------------

    async def _sender(self, conn: Http2Connection) -> None:
        # What waited for the connection goes urgent first: the normal lane
        # starts once the urgent one has sent what it had, or found nothing.
        urgent_sent = trio.Event()
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(self._send_lane, conn, relay_queue.URGENT, nursery, urgent_sent)
            nursery.start_soon(self._send_lane, conn, relay_queue.NORMAL, nursery, urgent_sent)
            nursery.start_soon(self._send_receipts, conn)

    async def _send_lane(self, conn: Http2Connection, lane: int, nursery: trio.Nursery,
                         urgent_sent: trio.Event) -> None:
        """One lane's transactions, one in flight at a time (that is the
        lane's order).  While the hub works on one, the next is read from the
        store; once it answers, the answer is committed here in the
        background while the next is already on its way: the hub has both
        in order, and an envelope whose answer is not committed yet is left
        out of the next reads (were that commit lost, the envelope would
        simply go again and the hub would recognise it)."""
        slots = trio.Semaphore(SETTLING_MAX)
        ahead = self._ahead[lane] = []
        if lane == relay_queue.NORMAL:
            await urgent_sent.wait()
        while True:
            changed = self.outbox_changed.watch()
            if lane not in self._pending:
                full = len(ahead) == self.config.uplink.batch_max
                batch, ahead[:] = ahead[:], []
                if not full:
                    batch = await self._next_batch(lane)
                if not batch:
                    if lane == relay_queue.URGENT:
                        urgent_sent.set()
                    await changed.wait()
                    continue
                self._pending[lane] = (secrets.token_urlsafe(16), batch)
            txn_id, batch = self._pending[lane]
            wire = protocol.encode_transaction([envelope for _, envelope in batch])
            async with trio.open_nursery(strict_exception_groups=True) as exchange:
                exchange.start_soon(self._read_ahead, lane, batch, ahead)
                body = await self._post(conn, protocol.PATH_TRANSACTION + txn_id, wire)
            outcomes = protocol.decode_outcomes(body, len(batch))
            del self._pending[lane]
            if lane == relay_queue.URGENT:
                urgent_sent.set()
            self._settling[lane].update((seq, envelope.id) for seq, envelope in batch)
            await slots.acquire()
            nursery.start_soon(self._settle, lane, [(seq, env, o) for (seq, env), o in zip(batch, outcomes)], slots)

    async def _next_batch(self, lane: int, sent: Iterable[tuple[int, protocol.Envelope]] = ()
                          ) -> list[tuple[int, protocol.Envelope]]:
        """The lane's next batch, past the envelopes ``sent`` and those settling."""
        domain, limit = self.config.domain, self.config.uplink.batch_max
        after = max((*self._settling[lane], *(seq for seq, _ in sent)), default=0)
        return await self.store.read("next_batch", lambda c: relay_queue.next_batch(
            c, domain, limit, now=time.time(), lane=lane, after=after))

    async def _read_ahead(self, lane: int, sent: list[tuple[int, protocol.Envelope]],
                          ahead: list[tuple[int, protocol.Envelope]]) -> None:
        """Fill ``ahead`` with the batch after ``sent``.  Only a full one is
        used as is: a partial one is read again, since more may have come."""
        ahead[:] = await self._next_batch(lane, sent)

    async def _settle(self, lane: int, results: list[tuple[int, protocol.Envelope, protocol.Outcome]],
                      slots: trio.Semaphore) -> None:
        """Commit the hub's answer to a transaction: the envelopes leave the outbox."""
        try:
            notified = await self.store.run("apply_outcomes",
                                            lambda c: relay_queue.apply_outcomes(c, results, now=time.time()))
        finally:
            for seq, _, _ in results:
                self._settling[lane].pop(seq, None)
            slots.release()
        self._on_events(notified)
        for _, env, outcome in results:
            self.counts["sent" if outcome.accepted else "refused", env.priority] += len(env.rcpt)
            if not outcome.accepted:
                log.warning("hub refused message %s for %s: %s", env.id, env.dest, outcome.reason,
                            extra={"message_id": env.id})

    async def _send_receipts(self, conn: Http2Connection) -> None:
        """Send pending read receipts; they are idempotent, so a lost answer
        just means sending them again."""
        domain = self.config.domain
        while True:
            changed = self.outbox_changed.watch()
            pending = await self.store.read("next_receipts", lambda c: relay_queue.next_receipts(c, domain, 500))
            if not pending:
                await changed.wait()
                continue
            body = await self._post(conn, protocol.PATH_RECEIPTS, protocol.encode_receipts([r for _, r in pending]))
            outcomes = protocol.decode_outcomes(body, len(pending))
            await self.store.run("drop_receipts",
                                 lambda c: relay_queue.drop_receipts(c, [seq for seq, _ in pending]))
            for (_, receipt), outcome in zip(pending, outcomes):
                if not outcome.accepted:
                    log.warning("hub refused the read receipt of message %s: %s", receipt.id, outcome.reason)

    async def _post(self, conn: Http2Connection, path: str, body: bytes) -> bytes:
        status, answer = await conn.request(
            "POST", path, body, authority=self.config.uplink.server_name, content_type=protocol.MSGPACK,
            limit=ANSWER_LIMIT,
        )
        if status != 200:
            raise UplinkError(f"hub answered {status} to {path}: {_error_text(answer)}")
        return answer

    # -- receiving ---------------------------------------------------------------------

    async def _receiver(self, conn: Http2Connection) -> None:
        self._receiver_scope = trio.CancelScope()
        with self._receiver_scope:
            await self._receive(conn)

    async def _receive(self, conn: Http2Connection) -> None:
        up = self.config.uplink
        stream = conn.open_stream(
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", up.server_name.encode()),
                (b":path", protocol.PATH_INBOX.encode()),
                (b"accept", protocol.MSGPACK),
            ],
            end_stream=True,
        )
        self._inbox = stream
        try:
            await self._consume_inbox(conn, stream)
        finally:
            self._inbox = None
            stream.reset()

    async def _consume_inbox(self, conn: Http2Connection, stream: H2Stream) -> None:
        headers = await stream.receive_headers()
        if status_of(headers) != 200:
            raise UplinkError(f"hub answered {status_of(headers)} to the inbox request")
        unpacker = protocol.stream_unpacker()
        slots = trio.Semaphore(ACKS_MAX)
        async with trio.open_nursery(strict_exception_groups=True) as acks:
            while True:
                data = await stream.receive_some()
                if not data:
                    raise ConnectionClosed("the hub ended the inbox stream")
                try:
                    items = []
                    view = memoryview(data)
                    for start in range(0, len(view), protocol.MAX_ITEM_BYTES):  # within the unpacker's bound
                        unpacker.feed(view[start:start + protocol.MAX_ITEM_BYTES])
                        items += [InboxItem.from_wire(obj) for obj in unpacker]
                except ProtocolViolation:
                    raise
                except Exception as exc:  # msgpack's own errors: BufferFull, ExtraData, ...
                    raise ProtocolViolation(f"inbox stream: undecodable item ({exc.__class__.__name__})") from None
                for start in range(0, len(items), INBOUND_BATCH):
                    failures = await self._take(items[start:start + INBOUND_BATCH])
                    await slots.acquire()
                    acks.start_soon(self._ack, conn, [item.seq for item in items[start:start + INBOUND_BATCH]],
                                    failures, slots)

    async def _take(self, items: list[InboxItem]) -> list[protocol.Failure]:
        """Commit what the hub sent; return the failures its ack reports."""
        await self._wait_for_room()
        receipts = [item.receipt for item in items if item.receipt is not None]

        def take(db: sqlite3.Connection) -> tuple:
            facts = relay_queue.delivery_facts(db, (r.id for r in receipts))
            now = time.time()
            return relay_inbox.take_inbound(db, self.config.domain, items, self._systems_serving, now=now), facts

        urgent = any(item.envelope is not None and item.envelope.priority == "urgent" for item in items)
        (failures, woken), facts = await self.store.run("take_inbound", take, urgent=urgent)
        self._count_receipts(receipts, facts)
        self._on_events(woken)
        return failures

    async def _ack(self, conn: Http2Connection, seqs: list[int], failures: list[protocol.Failure],
                   slots: trio.Semaphore) -> None:
        """Acknowledge committed positions, while the stream goes on: a lost
        ack only means the hub sends them again, and they are dropped here."""
        try:
            await self._post(conn, protocol.PATH_ACK, protocol.encode_ack(seqs, failures))
        finally:
            slots.release()

    async def _wait_for_room(self) -> None:
        """Above the store's ceiling, stop taking from the hub (which keeps
        the messages meanwhile); HTTP/2 flow control pushes back on it."""
        ceiling = self.config.store.max_bytes
        if self.store.used_bytes > ceiling:
            log.warning("store above its ceiling (%d bytes): not taking messages from the hub", ceiling)
            while self.store.used_bytes > ceiling:
                await trio.sleep(ROOM_POLL)
            log.info("store below its ceiling again: taking messages from the hub")

    def _systems_serving(self, address: str) -> list[str]:
        return [system.name for system in self.config.systems_serving(address)]

    def _count_receipts(self, receipts: list[protocol.Receipt], facts: dict[str, tuple[str, float]]) -> None:
        """Delivery counters and latency (acceptance here to the destination
        relay's commit), for the receipts about messages sent from here."""
        now = time.time()
        for receipt in receipts:
            if receipt.id not in facts or receipt.status not in ("delivered", "failed"):
                continue
            priority, accepted_at = facts[receipt.id]
            self.counts[receipt.status, priority] += len(receipt.rcpt)
            if receipt.status == "delivered":
                self.on_delivered(priority, now - accepted_at)


def _national_tls(config: RelayConfig) -> tuple[ssl.SSLContext, RevocationList]:
    """The TLS context and revocation list of the link to the hub."""
    up = config.uplink
    return relay_client_context(up.cert_file, up.key_file, up.ca_file, up.tls), RevocationList(up.tls, up.ca_file)


def _tls_stamp(config: RelayConfig) -> tuple:
    """What the connection to the hub is made of: its settings, and the
    identity of each file it loads, so that a file renewed in place counts."""
    up = config.uplink
    files = []
    for path in (up.cert_file, up.key_file, up.ca_file, *up.tls.crl_files):
        try:
            info = os.stat(path)
            files.append((str(path), info.st_ino, info.st_size, info.st_mtime_ns))
        except OSError:
            files.append((str(path), None))
    return (up.hub_host, up.hub_port, up.server_name, up.proxy, up.tls, tuple(files))


def _error_text(body: bytes) -> str:
    try:
        answer = protocol.unpack(body, "error")
        return f"{answer.get('error')}: {answer.get('detail')}"
    except (ProtocolViolation, AttributeError):
        return f"{len(body)} bytes of unreadable answer"


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out connecting"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the hub's certificate was refused ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return str(exc) or exc.__class__.__name__
