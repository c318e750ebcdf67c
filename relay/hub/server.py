"""The reference national hub: routes envelopes between relays.

Theory of operation
-------------------
Relays dial in over mutual TLS; the domain a relay speaks for is the first
DNS name of its certificate's subjectAltName, verified against the national
CA.  Each connection is one `Http2Connection` whose streams are served by
`HubConnection`:

* ``POST /v1/transactions/{id}``: a batch of envelopes.  One store unit
  checks each envelope (sender of the connection's domain, destination
  known, well-formed), drops the ones already queued, queues the rest for
  their destination, and records the answer under the transaction id, all
  in one commit.  Only then does the relay get its answer.
* ``GET /v1/inbox``: a long-lived stream of the domain's queue, urgent lane
  first.  At most `INBOX_WINDOW` items are in flight unacknowledged; a new
  inbox stream for the same domain replaces the old one and starts again
  from the oldest unacknowledged item.
* ``POST /v1/ack``: positions the relay has durably taken.  They leave the
  queue and each message's origin gets a ``delivered`` (or ``failed``)
  receipt, in the same commit.
* ``POST /v1/receipts``: ``read`` receipts from a destination relay, each
  routed to the message's origin if that relay really received it.

Offline domains simply accumulate: store-and-forward is the queue itself,
until a message's time-to-live runs out and its origin gets ``expired``.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate

import trio

from relay.config.model import HubConfig
from relay.core import protocol, routes
from relay.core.addresses import is_domain
from relay.core.h2session import BodyTooLarge, Http2Settings, header
from relay.core.priority import NORMAL, URGENT
from relay.core.protocol import ProtocolViolation
from relay.core.routes import Route
from relay.hub.admission import Gate, Limits, Ticket
from relay.hub.counters import HubCounters
from relay.net.errors import reason
from relay.net.h2connection import H2Stream, Http2Connection
from relay.net.revocation import RevocationList, Revoked
from relay.net.tls import hub_server_context
from relay.net.wakeup import Signal
from relay.pki.identity import PeerIdentity, peer_identity
from relay.store import audit, hub_queue
from relay.store.engine import Store, StoreUnavailable

log = logging.getLogger(__name__)

# Items sent on an inbox stream and not yet acknowledged: enough to keep a
# relay busy between two acks (it acks without stopping the stream), few
# enough that an urgent item, which goes first from the hub, has little to
# wait behind at the relay; and a stuck relay costs little memory.
INBOX_WINDOW = 500
INBOX_FETCH = 250
# A request's body must arrive within this.
BODY_TIMEOUT = 30.0
# After a failed accept (no file descriptor left): a pause, not a busy loop.
ACCEPT_BACKOFF = 0.1


@dataclass
class DomainLink:
    """The hub's view of one destination domain's relay."""

    changed: Signal = field(default_factory=Signal)
    inbox_scope: trio.CancelScope | None = None
    unacked: set[int] = field(default_factory=set)


class Hub:
    """Serves relays' connections (see the module docstring); its bounds are
    `relay.hub.admission`'s, and it reports what happens to ``counters``."""

    def __init__(self, config: HubConfig, store: Store, counters: HubCounters) -> None:
        self.config = config
        self.store = store
        self.counters = counters
        self.links: dict[str, DomainLink] = {}
        self._ssl = hub_server_context(config.cert_file, config.key_file, config.ca_file, config.tls)
        self._revocation = RevocationList(config.tls, config.ca_file)
        self._known: set[str] = set()
        self._connections: set[Http2Connection] = set()
        self.gate = Gate(_limits(config))
        # True while the listeners take connections: set once they are
        # bound, cleared first thing at shutdown.
        self.accepting = False
        self._accepting: trio.CancelScope | None = None
        self._listeners_closed = trio.Event()
        # The last sweep: when it ended, what it expired and pruned (status).
        self.last_sweep: float | None = None
        self.last_sweep_counts: dict[str, int] = {}

    async def stage_config(self, config: HubConfig,
                           commit: Callable[[Callable[[sqlite3.Connection], set[str]]], Awaitable[set[str]]],
                           ) -> Callable[[], None]:
        """Build what ``config`` needs (SIGHUP, or renewed files) and return
        the swap to it, which cannot fail: new handshakes then present the
        new certificate and check the new CA and CRLs; connections already
        up go on.  Newly listed domains are registered by the store unit
        handed to ``commit`` (which writes it with the reload's audit
        record, in one transaction).  Raises what loading the TLS files
        raises, or what ``commit`` raises, having changed nothing."""
        tls = hub_server_context(config.cert_file, config.key_file, config.ca_file, config.tls)
        revocation = RevocationList(config.tls, config.ca_file)
        limits = _limits(config)

        def register(conn: sqlite3.Connection) -> set[str]:
            hub_queue.register_domains(conn, config.domains, learnt=False, now=time.time())
            return hub_queue.known_domains(conn)

        known = await commit(register)

        def swap() -> None:
            self.config, self._ssl, self._revocation = config, tls, revocation
            self.gate.limits = limits  # new connection limits apply to new connections
            self._known = self._known | known  # with any domain learnt meanwhile

        return swap

    def check_revocation(self, der: bytes) -> None:
        """Raise `Revoked` if the certificate ``der`` is revoked by the CRLs
        in force now (they may have changed since its handshake)."""
        self._revocation.check(der)

    def link(self, domain: str) -> DomainLink:
        return self.links.setdefault(domain, DomainLink())

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.store.run("register_configured_domains",
                             lambda c: hub_queue.register_domains(c, self.config.domains, learnt=False,
                                                                  now=time.time()))
        self._known = await self.store.run("known_domains", hub_queue.known_domains)
        listen = self.config.listen
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as connections:
                async with trio.open_nursery(strict_exception_groups=True) as accepting:
                    self._accepting = accepting.cancel_scope  # `stop_accepting` ends these, not the connections
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, connections)
                    accepting.start_soon(self._sweep_periodically)
                    self.accepting = True
                    log.info("hub %s listening on %s", self.config.name,
                             ", ".join(_sockname(listener) for listener in listeners))
                    task_status.started(listeners)
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                self._listeners_closed.set()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept on ``listener`` until `stop_accepting`; each connection is
        served in ``connections``, which outlives the accepting (a drain)."""
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:  # out of file descriptors, say: the hub goes on
                log.error("cannot accept a connection: %s", exc.strerror or exc)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            connections.start_soon(self._on_tcp, tcp)

    async def _sweep_periodically(self) -> None:
        """Expire, prune the audit trail and the replay records, every
        ``expiry_interval``.  A round that fails is logged and the next one
        tried: the sweep never ends the hub."""
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("the hub's sweep failed; trying again in %g s", self.config.expiry_interval)
            await trio.sleep(self.config.expiry_interval)

    async def sweep(self) -> None:
        """One round: fail the expired messages, prune the audit trail and
        the replay records past the window (a unit per batch)."""
        config = self.config
        woken = await self.store.run_patiently("expire", lambda c: hub_queue.expire(c, time.time()))
        await self.store.run_patiently(
            "prune_audit", lambda c: audit.prune(c, time.time(), config.audit_retention))
        for domain in woken:
            self.link(domain).changed.fire()
        pruned = {"seen": 0, "txn": 0}
        while True:  # a unit per batch: the writer is never held for long
            batch = await self.store.run_patiently(
                "prune_replays", lambda c: hub_queue.prune_replays(c, time.time(), config.replay_window))
            for table, count in batch.items():
                pruned[table] += count
                self.counters.pruned.labels(table).inc(count)
            if max(batch.values()) < hub_queue.PRUNE_BATCH:
                break
        expired = sum(woken.values())
        self.counters.expired.inc(expired)
        self.counters.sweeps.inc()
        self.last_sweep = time.time()
        self.last_sweep_counts = {"expired": expired, **pruned}

    async def stop_accepting(self) -> None:
        """Shutdown, first step: no new connection from now on (the
        listening sockets are closed, handshakes in progress end)."""
        self.accepting = False
        if self._accepting is not None:
            self._accepting.cancel()
        self.gate.close_handshakes()
        await self._listeners_closed.wait()
        log.info("hub %s no longer accepts connections", self.config.name)

    async def shutdown(self) -> None:
        """Graceful stop: stop accepting, GOAWAY on every connection, then
        in-flight requests finish (each connection within its drain time).

        Inbox streams never finish by themselves: they are ended once no new
        stream can replace them; relays resume them from their last ack."""
        await self.stop_accepting()
        for conn in self._connections:
            conn.send_goaway()
        for link in self.links.values():
            if link.inbox_scope is not None:
                link.inbox_scope.cancel()
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            for conn in list(self._connections):
                nursery.start_soon(conn.aclose_gracefully)

    async def _on_tcp(self, tcp: trio.SocketStream) -> None:
        """One relay connection, from TCP to its end.  Whatever goes wrong
        with it (the store unavailable while admitting it, a certificate
        that cannot be read...) ends this connection, never the hub."""
        peer = _peer(tcp)
        ticket = self.gate.enter()
        if ticket is None:
            self.counters.refused.labels("capacity").inc()
            log.warning("refused %s: the hub holds max_connections (%d) already", peer, self.config.max_connections)
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._serve_tcp(tcp, ticket, peer)
        except Exception:
            self.counters.refused.labels("error").inc()
            log.exception("connection from %s failed", peer)
        finally:
            self.gate.leave(ticket)
            await trio.aclose_forcefully(tcp)

    async def _serve_tcp(self, tcp: trio.SocketStream, ticket: Ticket, peer: str) -> None:
        stream = trio.SSLStream(tcp, self._ssl, server_side=True)
        with ticket.scope:
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
                outcome = "timed_out" if isinstance(exc, trio.TooSlowError) else "failed"
                self.counters.handshakes.labels(outcome).inc()
                log.warning("TLS handshake with %s failed: %s", peer, reason(exc))
                await trio.aclose_forcefully(stream)
                return
        if ticket.scope.cancelled_caught or ticket.evicted:
            self.counters.handshakes.labels("evicted").inc()
            log.warning("dropped the TLS handshake of %s: %s", peer,
                        "the hub is stopping" if not self.accepting else
                        "newer connections needed its place (max_handshakes or max_connections reached)")
            await trio.aclose_forcefully(stream)
            return
        self.counters.handshakes.labels("ok").inc()
        if stream.selected_alpn_protocol() != protocol.ALPN:
            await self._refuse(stream, "no_alpn", f"{peer} did not negotiate ALPN h2; closing")
            return
        der = stream.getpeercert(binary_form=True)
        identity = peer_identity(der)
        domain = _domain_of(identity)
        try:
            self._revocation.check(der)
        except Revoked as exc:
            await self._refuse(stream, "revoked", f"refused {peer} ({_who(identity)}): {exc}")
            return
        if not await self._admit(domain):
            await self._refuse(stream, "unknown_domain",
                               f"refused {peer} ({_who(identity)}): not a registered domain")
            return
        if not self.accepting:
            await self._refuse(stream, "shutting_down", f"refused {peer}: the hub is stopping")
            return
        if ticket.evicted:  # while its domain was being admitted
            await self._refuse(stream, "capacity", f"refused {peer}: newer connections needed its place")
            return
        if not self.gate.authenticate(ticket, domain):
            await self._refuse(stream, "domain_capacity",
                               f"refused {peer}: {domain} has max_connections_per_domain"
                               f" ({self.config.max_connections_per_domain}) connections already")
            return
        settings = Http2Settings(
            max_concurrent_streams=self.config.max_concurrent_streams,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_timeout=self.config.keepalive_timeout,
        )
        conn = Http2Connection(stream, client=False, settings=settings, name=f"{domain} ({peer})")
        self._connections.add(conn)
        log.info("relay %s connected from %s (org %s)", domain, peer, identity.org_id or "-")
        try:
            await conn.run(HubConnection(self, domain, identity, der, conn).handle)
        finally:
            self._connections.discard(conn)
            log.info("relay %s disconnected", domain)

    async def _refuse(self, stream: trio.SSLStream, why: str, message: str) -> None:
        self.counters.refused.labels(why).inc()
        log.warning("%s", message)
        await trio.aclose_forcefully(stream)

    async def _admit(self, domain: str) -> bool:
        if domain in self._known:
            return True
        if not domain or not self.config.learn_domains:
            return False
        await self.store.run("learn_domain", lambda c: hub_queue.register_domains(c, frozenset([domain]), learnt=True,
                                                                                  now=time.time()))
        self._known.add(domain)
        log.info("learnt new domain %s", domain)
        return True


def _limits(config: HubConfig) -> Limits:
    return Limits(config.max_connections, config.max_connections_per_domain, config.max_handshakes)


class HubConnection:
    """Serves the streams of one authenticated relay connection."""

    def __init__(self, hub: Hub, domain: str, identity: PeerIdentity, der: bytes, conn: Http2Connection) -> None:
        self.hub = hub
        self.domain = domain
        self.identity = identity
        self._der = der
        self.conn = conn
        # Stamped into every envelope this relay sends (as ``origin_org``):
        # only a value every relay's decoder takes (`protocol.is_org_id`).
        self.org_id = identity.org_id if protocol.is_org_id(identity.org_id) else ""
        if identity.org_id and not self.org_id:
            log.warning("%s: its organisation id (OU) is not 1 to %d printable characters; stamping none",
                        _who(identity), protocol.MAX_ORG_ID_CHARS)

    async def handle(self, stream: H2Stream) -> None:
        headers = stream.headers or []
        method = header(headers, b":method")
        path = (header(headers, b":path") or b"").decode("ascii", "replace")
        try:
            self.hub.check_revocation(self._der)  # a CRL that changed also ends open connections
        except Revoked as exc:
            log.warning("refused a request from %s: %s; closing its connection", _who(self.identity), exc)
            self.conn.abort()
            return
        try:
            match routes.match(method, path):
                case (Route.TRANSACTION, txn_id):
                    await self._transaction(stream, txn_id)
                case (Route.INBOX, _):
                    await self._inbox(stream)
                case (Route.ACK, _):
                    await self._ack(stream)
                case (Route.RECEIPTS, _):
                    await self._receipts(stream)
                case _:
                    await _answer(stream, *routes.NOT_FOUND.answer(f"no route for {path}"))
        except ProtocolViolation as exc:
            log.warning("refused request from %s: %s", self.domain, exc)
            await _answer(stream, *routes.BAD_REQUEST.answer(str(exc)))
        except BodyTooLarge as exc:
            log.warning("refused request from %s: %s", self.domain, exc)
            await _answer(stream, *routes.TOO_LARGE.answer(str(exc)))
        except StoreUnavailable as exc:
            await _answer(stream, *routes.UNAVAILABLE.answer(str(exc)))
        except trio.TooSlowError:
            log.warning("request from %s not received within %g s", self.domain, BODY_TIMEOUT)
            await _answer(stream, *routes.TIMEOUT.answer("request body too slow"))

    async def _transaction(self, stream: H2Stream, txn_id: str) -> None:
        body = await _read_body(stream)
        raw = protocol.decode_transaction(body)
        outcomes, woken = await self.hub.store.run(
            "accept_transaction",
            lambda c: hub_queue.accept_transaction(c, self.domain, txn_id, raw, self.org_id, now=time.time(),
                                                   replay_window=self.hub.config.replay_window),
            urgent=all(isinstance(e, dict) and e.get("priority") == "urgent" for e in raw),
        )
        self.hub.counters.transactions.inc()
        for outcome in outcomes:
            self.hub.counters.envelopes.labels(outcome.reason if not outcome.accepted else "accepted").inc()
        forged = sum(outcome.reason == protocol.SENDER_NOT_AUTHENTICATED for outcome in outcomes)
        if forged:
            log.warning("refused %d envelope(s) with a sender not of %s from %s", forged, self.domain,
                        _who(self.identity))
        for dest in woken:
            self.hub.link(dest).changed.fire()
        await _answer(stream, 200, protocol.encode_outcomes(outcomes))

    async def _ack(self, stream: H2Stream) -> None:
        seqs, failures = protocol.decode_ack(await _read_body(stream))
        woken = await self.hub.store.run(
            "apply_ack", lambda c: hub_queue.apply_ack(c, self.domain, seqs, failures, now=time.time())
        )
        self.hub.counters.acked.inc(len(seqs))
        link = self.hub.link(self.domain)
        link.unacked.difference_update(seqs)
        link.changed.fire()
        for origin in woken:
            self.hub.link(origin).changed.fire()
        await _answer(stream, 200, protocol.pack({"v": protocol.VERSION}))

    async def _receipts(self, stream: H2Stream) -> None:
        raw = protocol.decode_receipts(await _read_body(stream))
        outcomes, woken = await self.hub.store.run(
            "accept_receipts", lambda c: hub_queue.accept_receipts(c, self.domain, raw, now=time.time())
        )
        refused = sum(not o.accepted for o in outcomes)
        self.hub.counters.read_receipts.labels("routed").inc(len(outcomes) - refused)
        self.hub.counters.read_receipts.labels("refused").inc(refused)
        if refused:
            log.warning("refused %d receipt(s) about messages never received from %s",
                        sum(not o.accepted for o in outcomes), _who(self.identity))
        for origin in woken:
            self.hub.link(origin).changed.fire()
        await _answer(stream, 200, protocol.encode_outcomes(outcomes))

    async def _inbox(self, stream: H2Stream) -> None:
        link = self.hub.link(self.domain)
        if link.inbox_scope is not None:
            link.inbox_scope.cancel()  # a newer stream replaces a stale one
        with trio.CancelScope() as scope:
            link.inbox_scope = scope
            link.unacked.clear()
            stream.send_headers([(b":status", b"200"), (b"content-type", protocol.MSGPACK), _date()])
            sent = {URGENT: 0, NORMAL: 0}
            while True:
                changed = link.changed.watch()
                room = INBOX_WINDOW - len(link.unacked)
                rows = []
                if room > 0:
                    rows = await self.hub.store.read_patiently(  # the 200 is sent: no 503 now
                        "fetch_inbox",
                        lambda c: hub_queue.fetch_inbox(c, self.domain, sent, min(room, INBOX_FETCH),  # noqa: B023 -- awaited
                                                        now=time.time()),
                    )
                    await self._drop_unreadable(rows)
                if not rows:
                    await changed.wait()
                    continue
                chunk = bytearray()
                for seq, lane, kind, payload in rows:
                    sent[lane] = max(sent[lane], seq)
                    if payload is not None:
                        chunk += routes.inbox_frame(seq, kind, payload)
                        link.unacked.add(seq)
                if chunk:
                    await stream.send_data(bytes(chunk))
        if link.inbox_scope is scope:
            link.inbox_scope = None
        stream.reset()

    async def _drop_unreadable(self, rows: list[tuple[int, int, str, bytes | None]]) -> None:
        """Take the fetched items that cannot be opened out of the queue (see
        `hub_queue.drop_unreadable`); the stream goes on past them."""
        damaged = [seq for seq, _, _, payload in rows if payload is None]
        if damaged:
            await self.hub.store.run_patiently(
                "drop_unreadable", lambda c: hub_queue.drop_unreadable(c, self.domain, damaged, now=time.time()))


async def _read_body(stream: H2Stream) -> bytes:
    """A request body, bounded in size and in time (a stream that never
    sends its body must not hold a handler forever)."""
    with trio.fail_after(BODY_TIMEOUT):
        return await stream.read_body(protocol.MAX_TRANSACTION_BYTES)


async def _answer(stream: H2Stream, status: int, body: bytes) -> None:
    await stream.send_response(status, [(b"content-type", protocol.MSGPACK), _date()], body)


def _date() -> tuple[bytes, bytes]:
    """The Date header (RFC 9110 §6.6.1): ``eimis-relay doctor`` measures a
    relay's clock offset against it."""
    return b"date", formatdate(usegmt=True).encode()


def _domain_of(identity: PeerIdentity) -> str:
    """The domain a relay speaks for: the first DNS name of its certificate,
    lowercased, if it is a domain every relay's decoder takes as an envelope's
    ``origin`` (`addresses.is_domain`); "" otherwise (the relay is refused)."""
    name = identity.dns_names[0].lower() if identity.dns_names else ""
    return name if is_domain(name) else ""


def _peer(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
        return f"{host}:{port}"
    except OSError:
        return "?"


def _sockname(listener: trio.SocketListener) -> str:
    host, port, *_ = listener.socket.getsockname()
    return f"{host}:{port}"


def _who(identity: PeerIdentity) -> str:
    """A certificate's identity, for the log: names, organisation, serial."""
    names = ",".join(identity.dns_names) or "(no DNS name)"
    return f"certificate {_printable(names)} org {_printable(identity.org_id or '-')} serial {identity.serial:x}"


def _printable(text: str) -> str:
    """A name from a certificate, as the log may hold it: a control
    character would let it forge log lines, so such a name is quoted."""
    return text if text.isprintable() else ascii(text)
