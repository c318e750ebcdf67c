"""A small HTTP server for the local API: HTTP/1.1 (h11) and HTTP/2 on one port.

Local systems are written by many vendors: some speak HTTP/1.1 with
keep-alive, some HTTP/2 (cleartext with prior knowledge, or over TLS with
ALPN).  Both are served here and reduced to the same `Request` ->
`Response` call, so the API itself never sees the wire.

Every request is whole (body read, bounded by ``max_body``) before the
application runs; a request that is too slow to arrive (slowloris) or too
large is refused without reaching it.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from relay.core.h2session import Http2Settings
from relay.net.h2connection import H2Stream, Http2Connection

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Time allowed for a request's headers and body to arrive, and for an idle
# keep-alive connection to say something.
REQUEST_TIMEOUT = 30.0
IDLE_TIMEOUT = 120.0
MAX_HEADER_BYTES = 16 * 1024
# An oversized HTTP/2 request body is read and dropped up to this size
# before the 413, then the stream is reset.
DRAIN_LIMIT = 16 * 1024 * 1024
# An HTTP/2 request's :path: origin form, visible ASCII (RFC 9113 §8.3.1).
_H2_TARGET = re.compile(r"/[\x21-\x7e]*")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


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
        self._tls = tls
        self._slots = trio.Semaphore(max_connections)
        self._h2_connections: set[Http2Connection] = set()
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
        """Stop accepting, let in-flight requests finish within ``grace`` seconds, close."""
        self._accepting.cancel()
        with trio.move_on_after(grace):
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                for conn in list(self._h2_connections):
                    nursery.start_soon(conn.aclose_gracefully)
            while self._in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
        self._connections.cancel_scope.cancel()

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        if self._slots.value == 0:
            await trio.aclose_forcefully(stream)
            return
        async with self._slots:
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ssl.SSLError):
                pass
            except Exception:
                # A bulkhead: whatever one client did, the others are served.
                log.exception("local API: connection failed")
            finally:
                await trio.aclose_forcefully(stream)

    async def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        """Run the application, counting the request as in flight for `shutdown`."""
        try:
            parts = urlsplit(target)
            query = dict(parse_qsl(parts.query))
        except ValueError:
            return _error(400, "bad_request", "malformed request target")
        self._in_flight += 1
        try:
            return await self._app(Request(method, parts.path, query, headers, body))
        except Exception:
            log.exception("local API: %s %s failed", method, parts.path)
            return _error(500, "internal", "the relay failed to handle this request; it has been logged")
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        initial = b""
        if self._tls is not None:
            stream = trio.SSLStream(stream, self._tls, server_side=True)
            with trio.fail_after(REQUEST_TIMEOUT):
                await stream.do_handshake()
            is_h2 = stream.selected_alpn_protocol() == "h2"
        else:
            with trio.fail_after(IDLE_TIMEOUT):
                while len(initial) < len(H2_PREFACE) and H2_PREFACE.startswith(initial):
                    chunk = await stream.receive_some(len(H2_PREFACE) - len(initial))
                    if not chunk:
                        return
                    initial += chunk
            is_h2 = initial == H2_PREFACE
        if is_h2:
            await self._serve_h2(stream, initial)
        else:
            await self._serve_h11(stream, initial)

    # -- HTTP/2 ----------------------------------------------------------------------

    async def _serve_h2(self, stream: trio.abc.Stream, initial: bytes) -> None:
        # h2's header checks are off (see `Http2Settings.check_headers`):
        # `_h2_request` checks the pseudo-headers it uses, the API the rest.
        settings = Http2Settings(keepalive_interval=None, idle_timeout=IDLE_TIMEOUT, check_headers=False)
        conn = Http2Connection(stream, client=False, initial_data=initial, name="local client", settings=settings)
        self._h2_connections.add(conn)
        try:
            await conn.run(self._h2_request)
        finally:
            self._h2_connections.discard(conn)

    async def _h2_request(self, stream: H2Stream) -> None:
        headers: dict[str, str] = {}
        for name, value in stream.headers or []:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        method, target = headers.get(":method", ""), headers.get(":path", "")
        if not (method and _H2_TARGET.fullmatch(target)):
            # What h2's own checks would have refused (RFC 9113 §8.3.1),
            # and what would otherwise reach the logs and the audit trail.
            response = _error(400, "bad_request", "missing or malformed :method or :path")
        elif (body := await self._h2_body(stream)) is None:
            response = self._too_large()
        elif isinstance(body, Response):
            response = body
        else:
            response = await self._respond(method, target, headers, body)
        await stream.send_response(
            response.status,
            [*((k.encode(), v.encode()) for k, v in response.headers),
             (b"content-length", b"%d" % len(response.body))],
            response.body,
        )

    async def _h2_body(self, stream: H2Stream) -> bytes | Response | None:
        """The request body; None when it is over ``max_body``, a 408 when it
        is too slow to arrive.  A body already whole, the usual case (headers
        and DATA in one read), costs no timer."""
        if stream.ended:
            return await _read_h2_body(stream, self._max_body)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await _read_h2_body(stream, self._max_body)
        except trio.TooSlowError:
            return _error(408, "request_timeout", f"request not received within {REQUEST_TIMEOUT:g} s")

    # -- HTTP/1.1 --------------------------------------------------------------------

    async def _serve_h11(self, stream: trio.abc.Stream, initial: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        if initial:  # (an empty one would tell h11 the client closed)
            conn.receive_data(initial)
        while True:
            if not conn.trailing_data[0]:  # between requests: the client may idle a while
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
            try:
                # Then the whole request must arrive in time (slowloris).
                with trio.fail_after(REQUEST_TIMEOUT):
                    event = await _next_event(conn, stream)
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    request = await self._read_h11_request(conn, stream, event)
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return
                request = _closing(_error(exc.error_status_hint, "bad_request", str(exc)))
            response = request if isinstance(request, Response) else await self._respond(*request)
            await _send_h11(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
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


async def _read_h2_body(stream: H2Stream, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit``.

    An oversized body is still read (and dropped) up to `DRAIN_LIMIT`:
    common HTTP/2 clients send the whole request before they look at the
    response, and would see a reset instead of the 413 otherwise."""
    body = bytearray()
    received = 0
    while chunk := await stream.receive_some():
        received += len(chunk)
        if received > DRAIN_LIMIT:
            break
        if received <= limit:
            body += chunk
    return bytes(body) if received <= limit else None


def _error(status: int, code: str, message: str) -> Response:
    return Response.json(status, {"error": {"code": code, "message": message}})


def _closing(response: Response) -> Response:
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
