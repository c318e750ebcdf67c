"""The relay's one connection to the national hub: dial, check, serve, redial.

Theory of operation
-------------------
`UplinkConnection.run` dials the hub (directly or through a CONNECT proxy),
checks the hub's certificate and name, and hands the HTTP/2 connection, as
a `HubSession`, to ``serve`` (the uplink's senders and inbox receiver) until
it breaks; then it waits (`RetryPolicy`) and dials again.  A connection
that stayed up `STABLE_AFTER` seconds resets the backoff.  Whatever broke
it is said once in ``last_error``, which the operations tools show.

The TLS material is loaded when the configuration is: `swap_config` loads
the new files before it changes anything, and when the certificate, key,
CA, CRLs or the way to the hub changed it rolls the connection over:
``on_closing`` ends the inbox stream, a transaction in flight gets its
answer (a graceful close), and the relay dials again at once with the new
material, without backing off.  Nothing queued is touched: the outbox is
in the store, and the inbox resumes at the hub's last acknowledged item.

Deadlines: every request to the hub (`HubSession.post`) must be answered
within ``[uplink] request_timeout``.  A hub that keeps the connection up
(it answers PINGs) but leaves a request unanswered would otherwise stop
that lane for good; past the deadline the request fails with `HubTimeout`,
a `ConnectionClosed`: the connection is given up, and what was unanswered
is replayed on the next one under the same id.  Each kind of request keeps
a `Progress`, which the health reports read: stalled from the first
timeout until the hub answers one of its requests again.
"""

from __future__ import annotations

import enum
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from relay.config.model import RelayConfig
from relay.config.stamps import files_stamp
from relay.core import protocol, routes
from relay.core.backoff import RetryPolicy
from relay.core.h2session import ConnectionClosed, Http2Settings, StreamReset
from relay.core.protocol import ProtocolViolation
from relay.net.errors import reason
from relay.net.h2connection import H2Stream, Http2Connection
from relay.net.proxy import dial
from relay.net.revocation import RevocationList, Revoked
from relay.net.tls import relay_client_context
from relay.net.wakeup import Signal
from relay.pki.identity import peer_identity
from relay.store.engine import StoreUnavailable

log = logging.getLogger(__name__)

# A connection that stayed up this long resets the backoff: the hub is fine.
STABLE_AFTER = 30.0


class UplinkState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DOWN = "down"


class UplinkError(Exception):
    """The hub is not one this relay can go on with (ALPN, organisation)."""


class HubTimeout(ConnectionClosed):
    """The hub left a request unanswered past ``[uplink] request_timeout``:
    the connection is treated as broken (the request is replayed on a new one)."""


class Progress:
    """Whether one kind of request to the hub (a lane, the read receipts,
    the inbox acks, the inbox stream) is getting answers: for ``status``,
    ``/readyz``, systemd's STATUS= line and the metrics.

    Stalled from a request's timeout until the hub answers one of that
    kind again (`moving`), across reconnections: a lane whose transaction
    times out on every connection makes no progress although the
    connection comes back each time.  Wall-clock times, as the reports
    show them."""

    def __init__(self, lane: str, what: str) -> None:
        self.lane = lane  # the metrics' label
        self.what = what  # for people: "the urgent lane"
        self.timeouts = 0  # requests left unanswered since the start
        self.stalled_since: float | None = None
        self.stalled_timeouts = 0  # ...since stalled_since
        self.unanswered = ""  # the last request left unanswered

    def moving(self) -> None:
        """The hub answered (or, for the inbox acks, has nothing left to acknowledge)."""
        if self.stalled_since is not None:
            log.info("uplink: %s is moving again", self.what)
        self.stalled_since, self.stalled_timeouts = None, 0

    def timed_out(self, request: str) -> None:
        self.timeouts += 1
        self.stalled_timeouts += 1
        self.unanswered = request
        if self.stalled_since is None:
            self.stalled_since = time.time()

    def stall(self) -> dict | None:
        """The stall as the status snapshot shows it; None when moving."""
        if self.stalled_since is None:
            return None
        return {"lane": self.lane, "what": self.what, "since": self.stalled_since,
                "timeouts": self.stalled_timeouts, "unanswered": self.unanswered}


class HubSession:
    """The relay<->hub requests (`relay.core.routes`) over one connection.

    Error handling: besides what the connection raises (`ConnectionClosed`,
    `StreamReset`), `post` raises `routes.HubAnswerError` for an answer
    other than 200, and `HubTimeout` for none within ``timeout`` seconds;
    either way the connection is given up."""

    def __init__(self, conn: Http2Connection, authority: str, timeout: float) -> None:
        self._conn = conn
        self._authority = authority
        self.timeout = timeout

    async def post(self, request: routes.Request, progress: Progress) -> bytes:
        """Send ``request`` and return the body of the hub's 200 answer;
        ``progress`` learns whether it came in time."""
        with trio.move_on_after(self.timeout) as deadline:
            status, answer = await self._conn.request(
                request.method, request.path, request.body, authority=self._authority,
                content_type=request.content_type, limit=routes.ANSWER_LIMIT,
            )
        if deadline.cancelled_caught:
            what = f"{request.method} {request.path}"
            progress.timed_out(what)
            raise HubTimeout(f"the hub did not answer {what} within {self.timeout:g} s")
        body = routes.answer_body(request, status, answer)
        progress.moving()
        return body

    def open_inbox(self) -> H2Stream:
        """Start ``GET /v1/inbox``; the caller reads the answer and resets the stream."""
        return self._conn.open_stream(routes.inbox_headers(self._authority), end_stream=True)


class UplinkConnection:
    """See the module docstring.  ``serve`` runs over each connection until
    it raises (which ends the connection); ``on_closing`` is called before
    a graceful close, to end the streams that never end by themselves."""

    def __init__(self, config: RelayConfig, serve: Callable[[HubSession], Awaitable[None]],
                 on_closing: Callable[[], None]) -> None:
        self.config = config
        self._serve = serve
        self._on_closing = on_closing
        self._ssl, self._revocation = _national_tls(config)
        self._tls_stamp = _tls_stamp(config)
        self._policy = RetryPolicy(config.uplink.backoff_initial, config.uplink.backoff_max)
        self.state = UplinkState.CONNECTING
        self.since = time.time()
        self.last_error: str | None = None
        self.attempts = 0
        # For the operations tools: fired on every state change; when the
        # hub's certificate expires (seen at the last handshake).
        self.changed = Signal()
        self.hub_cert_expires: float | None = None
        self._conn: Http2Connection | None = None
        self._nursery: trio.Nursery | None = None
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
        CA, CRLs or the way to the hub changed, the connection rolls over
        (see the module docstring)."""
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
                     StreamReset, ProtocolViolation, UplinkError, routes.HubAnswerError, Revoked,
                     StoreUnavailable) as group:
                if not self._rolling_over:
                    # Each task on the connection may fail of the same cause: say it once.
                    self.last_error = "; ".join(dict.fromkeys(reason(e) for e in _leaves(group)))
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
        # One deadline for the whole setup; the step it caught is named.
        step = "TCP connection" + (" to the proxy and its answer to CONNECT" if up.proxy else "")
        with trio.move_on_after(up.connect_timeout) as deadline:
            tcp = await dial(up.hub_host, up.hub_port, up.proxy)
            step = "TLS handshake"
            tls = trio.SSLStream(tcp, self._ssl, server_hostname=up.server_name)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
        if deadline.cancelled_caught:  # what was opened is closed already
            raise HubTimeout(f"{step} not done within connect_timeout ({up.connect_timeout:g} s)")
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
            nursery.start_soon(self._serve, HubSession(conn, up.server_name, up.request_timeout))
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
        """Graceful stop: ``on_closing`` (the inbox stream ends, its RST
        ahead of the GOAWAY), then a transaction in flight may finish."""
        self._on_closing()
        if self._conn is not None:
            await self._conn.aclose_gracefully()


def _national_tls(config: RelayConfig) -> tuple[ssl.SSLContext, RevocationList]:
    """The TLS context and revocation list of the link to the hub."""
    up = config.uplink
    return relay_client_context(up.cert_file, up.key_file, up.ca_file, up.tls), RevocationList(up.tls, up.ca_file)


def _tls_stamp(config: RelayConfig) -> tuple:
    """What the connection to the hub is made of: its settings, and the
    identity of each file it loads, so that a file renewed in place counts."""
    up = config.uplink
    files = files_stamp((up.cert_file, up.key_file, up.ca_file, *up.tls.crl_files))
    return (up.hub_host, up.hub_port, up.server_name, up.proxy, up.tls, files)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
