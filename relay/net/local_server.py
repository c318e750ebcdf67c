"""A small HTTP server for the local API: HTTP/1.1 (h11) and HTTP/2 on one port.

Local systems are written by many vendors: some speak HTTP/1.1 with
keep-alive, some HTTP/2 (cleartext with prior knowledge, or over TLS with
ALPN).  Both are served here and reduced to the same `Request` ->
`Response` call, so the API itself never sees the wire.

Every request is whole (body read, bounded by ``max_body``) before the
application runs; a request that is too slow to arrive (slowloris) or too
large is refused without reaching it.

Connection slots (``max_connections``) are what an anonymous peer can take
from the vendors, so none is held for nothing: a new connection has
`HEAD_TIMEOUT` for its TLS handshake and its first request's head; a
kept-alive connection between requests is closed after `IDLE_TIMEOUT`, or
at once when a new connection needs its slot, or when shutdown begins (a
request already partly received is still answered, with ``Connection:
close``; HTTP/2 connections get a GOAWAY).

A request declaring a body over ``max_body`` is answered 413 from its
``content-length`` before the body is read; one with no length is answered
as soon as it passes the limit.  The exchange is then ended so that clients
read the 413 rather than a reset (`_linger`, `_h2_discard`).  Everything
logged while a connection is served is charged to its peer (`peerlog`).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from relay.core.h2session import Http2Settings
from relay.net import peerlog
from relay.net.h2connection import H2Stream, Http2Connection

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A new connection's TLS handshake and first request head must arrive within
# HEAD_TIMEOUT of its accept; a later request's head within HEAD_TIMEOUT of
# its first byte; a body within REQUEST_TIMEOUT of its head; a kept-alive
# connection may idle IDLE_TIMEOUT between requests.
HEAD_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
IDLE_TIMEOUT = 120.0
MAX_HEADER_BYTES = 16 * 1024
# After a 413, the rest of an oversized body is read and dropped, up to
# DRAIN_LIMIT bytes and DRAIN_TIMEOUT seconds: clients that send a whole
# request before they look at the answer (httpx) would otherwise see a
# reset (HTTP/2) or a broken pipe (HTTP/1.1) instead of the 413.
DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_TIMEOUT = 10.0
# A new connection finding every slot taken waits this long for the slot of
# an idle connection it had closed.
EVICTION_WAIT = 1.0
# An HTTP/2 request's :path: origin form, visible ASCII (RFC 9113 §8.3.1).
_H2_TARGET = re.compile(r"/[\x21-\x7e]*")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    peer: str = "?"  # the client's IP address


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, document: object, headers: Sequence[tuple[str, str]] = ()) -> Response:
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, body, [("content-type", "application/json"), *headers])


App = Callable[[Request], Awaitable[Response]]
TooLarge = Callable[[], Response]


class HttpServer:
    """Serves ``app`` on every connection handed to `serve_connection`."""

    def __init__(self, app: App, *, max_body: int, too_large: TooLarge, tls: ssl.SSLContext | None = None,
                 max_connections: int = 256) -> None:
        self._app = app
        self._max_body = max_body
        self._too_large = too_large
        self.tls = tls  # a reload swaps in a new context: new connections use it
        self._slots = trio.Semaphore(max_connections)
        self._h2_connections: dict[Http2Connection, trio.Event] = {}  # -> set by its first request
        # Connections waiting for a request's first byte, oldest first: what
        # shutdown closes, and what a new connection may evict when full.
        self._waiting: dict[trio.CancelScope, bool] = {}  # -> evictable (it has served a request)
        self._stopping = False
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery
        self._in_flight = 0
        self._idle = trio.Event()

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and serve connections until `shutdown` has drained them."""
        async with trio.open_nursery(strict_exception_groups=True) as connections:
            self._connections = connections
            try:
                with self._accepting:
                    # trio's accept loops: they retry after a pause when out
                    # of file descriptors or memory (EMFILE, ENFILE, ENOMEM,
                    # ENOBUFS) and raise on anything else.
                    async with trio.open_nursery(strict_exception_groups=True) as accepting:
                        await accepting.start(
                            partial(trio.serve_listeners, self._serve_connection, listeners,
                                    handler_nursery=connections)
                        )
                        task_status.started()
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            await trio.sleep_forever()  # until shutdown cancels the connections

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within ``grace`` seconds, close.

        No new request is taken from then on: connections waiting for one
        are closed, the others close after their current answer."""
        self._stopping = True
        self._accepting.cancel()
        for waiting in list(self._waiting):
            waiting.cancel()
        with trio.move_on_after(grace):
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                for conn in list(self._h2_connections):
                    nursery.start_soon(conn.aclose_gracefully)
            while self._in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
        self._connections.cancel_scope.cancel()

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        peer = peerlog.address_of(stream)
        with peerlog.serving(peer):
            if self._slots.value == 0 and not self._evict_idle():
                await trio.aclose_forcefully(stream)
                return
            acquired = False
            with trio.move_on_after(EVICTION_WAIT):  # at once, unless a slot had to be freed
                await self._slots.acquire()
                acquired = True
            if not acquired:
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._serve(stream, peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ssl.SSLError):
                pass
            except Exception:
                # A bulkhead: whatever one client did, the others are served.
                log.exception("local API: connection failed")
            finally:
                self._slots.release()
                await trio.aclose_forcefully(stream)

    def _evict_idle(self) -> bool:
        """Close the longest-idle kept-alive connection (HTTP/1.1 between
        requests, or HTTP/2 with no stream open), so that a new connection
        gets its slot; False when every connection is busy."""
        for waiting, evictable in self._waiting.items():
            if evictable:
                del self._waiting[waiting]
                waiting.cancel()
                return True
        for conn, asked in self._h2_connections.items():
            if asked.is_set() and conn.active_streams == 0:
                del self._h2_connections[conn]
                conn.abort()
                return True
        return False

    @contextmanager
    def _first_byte_wait(self, *, evictable: bool) -> Iterator[trio.CancelScope]:
        """A scope around a wait for a request's first byte, which shutdown
        (and, if ``evictable``, a new connection short of a slot) cancels:
        the caller then closes the connection."""
        scope = trio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._waiting[scope] = evictable
        try:
            with scope:
                yield scope
        finally:
            self._waiting.pop(scope, None)

    async def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes, peer: str) -> Response:
        """Run the application, counting the request as in flight for `shutdown`."""
        try:
            parts = urlsplit(target)
            query = dict(parse_qsl(parts.query))
        except ValueError:
            return _error(400, "bad_request", "malformed request target")
        self._in_flight += 1
        try:
            return await self._app(Request(method, parts.path, query, headers, body, peer))
        except Exception:
            log.exception("local API: %s %s failed", method, parts.path)
            return _error(500, "internal", "the relay failed to handle this request; it has been logged")
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _serve(self, stream: trio.abc.Stream, peer: str) -> None:
        deadline = trio.current_time() + HEAD_TIMEOUT
        initial = b""
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
            with trio.fail_at(deadline):
                await stream.do_handshake()
            is_h2 = stream.selected_alpn_protocol() == "h2"
        else:
            with trio.fail_at(deadline):
                with self._first_byte_wait(evictable=False) as waiting:
                    initial = bytes(await stream.receive_some(len(H2_PREFACE)))
                if waiting.cancelled_caught:
                    return
                while initial and len(initial) < len(H2_PREFACE) and H2_PREFACE.startswith(initial):
                    chunk = await stream.receive_some(len(H2_PREFACE) - len(initial))
                    if not chunk:
                        return
                    initial += chunk
            if not initial:
                return
            is_h2 = initial == H2_PREFACE
        if is_h2:
            if not self._stopping:  # (nothing asked yet: a client retries elsewhere)
                await self._serve_h2(stream, initial, peer, deadline)
        else:
            await self._serve_h11(stream, initial, peer, deadline)

    # -- HTTP/2 ----------------------------------------------------------------------

    async def _serve_h2(self, stream: trio.abc.Stream, initial: bytes, peer: str, deadline: float) -> None:
        # h2's header checks are off (see `Http2Settings.check_headers`):
        # `_h2_request` checks the pseudo-headers it uses, the API the rest.
        settings = Http2Settings(keepalive_interval=None, idle_timeout=IDLE_TIMEOUT, check_headers=False)
        conn = Http2Connection(stream, client=False, initial_data=initial, name="local client", settings=settings)
        asked = self._h2_connections[conn] = trio.Event()  # set by its first request
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                nursery.start_soon(_abort_unless_asked, conn, asked, deadline)
                await conn.run(partial(self._h2_request, peer=peer, asked=asked))
                nursery.cancel_scope.cancel()
        finally:
            self._h2_connections.pop(conn, None)

    async def _h2_request(self, stream: H2Stream, *, peer: str, asked: trio.Event) -> None:
        asked.set()
        headers: dict[str, str] = {}
        for name, value in stream.headers or []:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        method, target = headers.get(":method", ""), headers.get(":path", "")
        declared = headers.get("content-length", "")
        if not (method and _H2_TARGET.fullmatch(target)):
            # What h2's own checks would have refused (RFC 9113 §8.3.1),
            # and what would otherwise reach the logs and the audit trail.
            response = _error(400, "bad_request", "missing or malformed :method or :path")
        elif declared.isdigit() and int(declared) > self._max_body:
            response = self._too_large()  # from the declared length: not a byte of the body read
        elif (body := await self._h2_body(stream)) is None:
            response = self._too_large()
        elif isinstance(body, Response):
            response = body
        else:
            response = await self._respond(method, target, headers, body, peer)
        await stream.send_response(
            response.status,
            [*((k.encode(), v.encode()) for k, v in response.headers),
             (b"content-length", b"%d" % len(response.body))],
            response.body,
        )
        if not stream.ended and response.status != 408:
            await _h2_discard(stream)

    async def _h2_body(self, stream: H2Stream) -> bytes | Response | None:
        """The request body; None as soon as it is over ``max_body``, a 408
        when it is too slow to arrive.  A body already whole, the usual case
        (headers and DATA in one read), costs no timer."""
        if stream.ended:
            return await _read_h2_body(stream, self._max_body)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await _read_h2_body(stream, self._max_body)
        except trio.TooSlowError:
            return _error(408, "request_timeout", f"request not received within {REQUEST_TIMEOUT:g} s")

    # -- HTTP/1.1 --------------------------------------------------------------------

    async def _serve_h11(self, stream: trio.abc.Stream, initial: bytes, peer: str, deadline: float) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        if initial:  # (an empty one would tell h11 the client closed)
            conn.receive_data(initial)
        first = True
        while True:
            if not conn.trailing_data[0]:  # between requests: the client may idle a while
                until = deadline if first else trio.current_time() + IDLE_TIMEOUT
                with trio.fail_at(until), self._first_byte_wait(evictable=not first) as waiting:
                    data = await stream.receive_some(65536)
                if waiting.cancelled_caught:
                    return
                conn.receive_data(bytes(data))
            if not first:
                deadline = trio.current_time() + HEAD_TIMEOUT
            try:
                # Then the head must arrive in time, and the body (slowloris).
                with trio.fail_at(deadline):
                    event = await _next_event(conn, stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await self._read_h11_request(conn, stream, event)
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return
                request = _closing(_error(exc.error_status_hint, "bad_request", str(exc)))
            first = False
            response = request if isinstance(request, Response) else await self._respond(*request, peer)
            if self._stopping:  # shutdown began: this answer is the connection's last
                _closing(response)
            await _send_h11(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                if conn.their_state is h11.SEND_BODY:  # refused before its body was read (413)
                    await _linger(stream)
                return
            conn.start_next_cycle()

    async def _read_h11_request(
        self, conn: h11.Connection, stream: trio.abc.Stream, event: object
    ) -> tuple[str, str, dict[str, str], bytes] | Response:
        """The whole request, or the error to answer at once (431, 413)."""
        assert isinstance(event, h11.Request)
        if sum(len(k) + len(v) for k, v in event.headers) > MAX_HEADER_BYTES:
            return _closing(_error(431, "headers_too_large", f"request headers larger than {MAX_HEADER_BYTES} bytes"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            return _closing(self._too_large())
        body = bytearray()
        while True:
            part = await _next_event(conn, stream)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self._max_body:
                    return _closing(self._too_large())
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("connection closed mid-request")
        return event.method.decode("latin-1"), event.target.decode("latin-1"), headers, bytes(body)


async def _abort_unless_asked(conn: Http2Connection, asked: trio.Event, deadline: float) -> None:
    """An HTTP/2 connection whose first request has not come by ``deadline``
    is closed: it would hold a slot for nothing."""
    with trio.move_on_at(deadline):
        await asked.wait()
    if not asked.is_set():
        conn.abort()


async def _read_h2_body(stream: H2Stream, limit: int) -> bytes | None:
    """The request body, or None as soon as it is over ``limit``."""
    body = bytearray()
    while chunk := await stream.receive_some():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _h2_discard(stream: H2Stream) -> None:
    """After an answer given before the request's end (413): read and drop
    what the client still sends, within bounds, so that it gets to read the
    answer.  curl stops sending when it sees an error status and ends the
    stream; httpx sends its whole body first, and takes any RST_STREAM
    before it is done, even NO_ERROR, for a failure.  Past the bounds
    `H2Session.finish` resets the stream with NO_ERROR (RFC 9113 §8.1)."""
    received = 0
    with trio.move_on_after(DRAIN_TIMEOUT):
        while received <= DRAIN_LIMIT and (chunk := await stream.receive_some()):
            received += len(chunk)


async def _linger(stream: trio.abc.Stream) -> None:
    """HTTP/1.1's lingering close after an answer given before the body was
    read: say we are done writing, then read and drop what the client
    still sends, within bounds.  Closing at once with unread bytes makes
    the kernel send a TCP reset, which can destroy the answer before a
    client that is still sending has read it."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        received = 0
        with trio.move_on_after(DRAIN_TIMEOUT):
            while received <= DRAIN_LIMIT and (chunk := await stream.receive_some(65536)):
                received += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _error(status: int, code: str, message: str) -> Response:
    return Response.json(status, {"error": {"code": code, "message": message}})


def _closing(response: Response) -> Response:
    if ("connection", "close") not in response.headers:
        response.headers.append(("connection", "close"))
    return response


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(bytes(data))


async def _send_h11(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    headers = [*response.headers, ("content-length", str(len(response.body)))]
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    if response.body:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
