"""HTTP/2 on trio: the thin shell around `relay.core.h2session`.

Theory of operation
-------------------
One `Http2Connection` owns one `H2Session` (the sans-I/O protocol logic,
which owns the h2 state machine) and one byte stream (TLS or plain TCP).
Every task changes the session's state synchronously through its stream's
methods and then wakes the connection's single *writer* task.  That writer
is the only code that awaits ``send_all``: a caller that is cancelled never
leaves half a frame on the wire, and a write that fails or is cancelled
kills the whole connection, which is never reused (h11's ``send_failed()``
rule).  A single *reader* task feeds received bytes to the session and
starts the handlers of the requests they opened.

Waiting happens here and only here: a sender whose flow-control window is
empty parks on its stream until a WINDOW_UPDATE (stream or connection) or
a SETTINGS change wakes it; a reader parks until DATA or the end of the
body comes.  Each `H2Stream` has one event for all of that, set by the
session whenever something about the stream changed; every waiter checks
again what it waits for.

Liveness: the connection sends a PING every ``keepalive_interval`` seconds
and declares the peer dead if no acknowledgement comes within
``keepalive_timeout``; a half-open TCP connection (no FIN, no RST) is found
that way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import h2.errors
import trio

from relay.core.h2session import (
    BodyTooLarge,
    ConnectionClosed,
    H2Session,
    Headers,
    Http2Settings,
    PeerMisbehaved,
    StreamReset,
    StreamState,
    status_of,
)

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


class H2Stream(StreamState):
    """One HTTP/2 stream, as seen by the application.

    Received DATA is buffered here and credited back to the peer only when
    `receive_some` hands it to the application.
    """

    def __init__(self, session: H2Session, stream_id: int) -> None:
        super().__init__(stream_id)
        self._session = session
        self._changed = trio.Event()

    def wake(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        """Until the session changes something about this stream."""
        # A new event only when the current one is set: another task (a
        # sender and a reader of the same stream) may wait on it.
        if self._changed.is_set():
            self._changed = trio.Event()
        await self._changed.wait()

    # -- receiving ---------------------------------------------------------

    async def receive_headers(self) -> Headers:
        """Wait for the peer's headers (the response, on a client stream)."""
        while self.headers is None:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.headers

    async def receive_some(self) -> bytes:
        """All of the body received so far and not read yet (waiting for
        some if there is none); ``b""`` once the peer ended the stream.
        Everything at once lets a reader that commits what it reads (an
        inbox) take one batch per wake-up rather than one per frame."""
        while not self.has_data:
            if self.ended:  # complete, even if a RST_STREAM followed (RFC 9113 §8.1)
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        return self._session.read(self)

    async def read_body(self, limit: int) -> bytes:
        """The whole body; `BodyTooLarge` past ``limit`` bytes.

        The stream is left open so that a server can still answer 413; a
        handler that returns without reading the rest gets the stream reset
        for it (see `H2Session.finish`)."""
        body = bytearray()
        while chunk := await self.receive_some():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(f"body larger than {limit} bytes")
        return bytes(body)

    # -- sending -----------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        self._session.send_headers(self, headers, end_stream=end_stream)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data``, waiting for flow-control credit as needed."""
        view = memoryview(data)
        while True:
            window = self._session.send_window(self)
            if window > 0 or not view:
                chunk, view = view[:window], view[window:]
                self._session.send_data(self, bytes(chunk), end_stream=end_stream and not view)
                if not view:
                    return
                continue  # park only when the window is empty, not after every chunk
            await self._wait()

    async def send_response(self, status: int, headers: Headers, body: bytes) -> None:
        self.send_headers([(b":status", str(status).encode()), *headers], end_stream=not body)
        if body:
            await self.send_data(body, end_stream=True)

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the stream; safe to call more than once."""
        self._session.reset(self, code)


Handler = Callable[[H2Stream], Awaitable[None]]


class Http2Connection:
    """One HTTP/2 connection, client or server side, over a trio stream.

    Resource handling: `run` owns the byte stream and closes it on the way
    out.  Error handling: when the connection dies, every open stream fails
    with `ConnectionClosed` (or `StreamRefused`) and `run` returns; a
    protocol error from the peer is answered with the GOAWAY h2 queued.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        settings: Http2Settings = Http2Settings(),
        initial_data: bytes = b"",
        name: str = "peer",
    ) -> None:
        self._stream = stream
        self._settings = settings
        self._initial_data = initial_data
        self.name = name
        self._session = H2Session(
            client=client, settings=settings, name=name, stream_class=H2Stream, on_change=self._session_changed
        )
        self._writer_wakeup = trio.Event()
        self._flushed = trio.Event()  # set by the writer when it runs out of bytes
        self._pong = trio.Event()
        self._no_streams = trio.Event()
        self._no_streams.set()
        self._cancel_scope: trio.CancelScope | None = None
        self._handler: Handler | None = None

    @property
    def is_open(self) -> bool:
        return self._session.is_open

    @property
    def active_streams(self) -> int:
        return self._session.active_streams

    @property
    def session(self) -> H2Session:
        """The protocol state, for inspection; change it only through the streams."""
        return self._session

    async def run(
        self,
        handler: Handler | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drive the connection until it closes; serve requests with ``handler``.

        ``handler`` is required on the server side: it is started once per
        incoming stream, in a nursery that dies with the connection.
        """
        self._handler = handler
        self._session.start(serving=handler is not None)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                if self._settings.keepalive_interval:
                    nursery.start_soon(self._keepalive)
                if self._settings.idle_timeout:
                    nursery.start_soon(self._close_when_idle, self._settings.idle_timeout)
                task_status.started()
                await self._reader(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._die(ConnectionClosed(f"connection to {self.name} closed"))
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._stream.aclose()

    # -- client side -----------------------------------------------------------

    def open_stream(self, headers: Headers, *, end_stream: bool = False) -> H2Stream:
        """Start a request; the caller sends its body and reads the response."""
        stream = self._session.open_stream(headers, end_stream=end_stream)
        assert isinstance(stream, H2Stream)
        return stream

    async def request(
        self, method: str, path: str, body: bytes, *, authority: str, content_type: bytes, limit: int
    ) -> tuple[int, bytes]:
        """A whole request/response exchange: the usual case for the uplink."""
        stream = self.open_stream(
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
            end_stream=not body,
        )
        try:
            if body:
                try:
                    await stream.send_data(body, end_stream=True)
                except StreamReset:
                    # A server may answer before reading the whole body, then
                    # reset with NO_ERROR: "clients MUST NOT discard responses"
                    # (RFC 9113 §8.1).
                    if not stream.ended:
                        raise
            headers = await stream.receive_headers()
            return status_of(headers), await stream.read_body(limit)
        finally:
            stream.reset()  # no-op when the stream completed

    # -- shutdown ----------------------------------------------------------------

    def send_goaway(self) -> None:
        """Refuse new streams from now on (GOAWAY); the ones in flight go on."""
        self._session.send_goaway()

    async def aclose_gracefully(self) -> None:
        """GOAWAY, let in-flight streams finish (bounded), then close."""
        self.send_goaway()
        with trio.move_on_after(self._settings.drain_timeout):
            await self._no_streams.wait()
            # The last answers are queued in the session, not yet written.
            await self._flush()
        self.abort()

    def abort(self) -> None:
        """Close now: `run` returns and every open stream fails."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self._die(ConnectionClosed(f"connection to {self.name} closed"))

    # -- the tasks ---------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            if data := self._session.data_to_send():
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._die(ConnectionClosed(f"connection to {self.name} lost: {exc}"))
                    return
            else:
                self._flushed.set()  # everything queued so far is written
                self._writer_wakeup = trio.Event()
                await self._writer_wakeup.wait()

    async def _reader(self, nursery: trio.Nursery) -> None:
        data = self._initial_data
        while True:
            if data:
                try:
                    received = self._session.receive_data(data, trio.current_time())
                except PeerMisbehaved as exc:
                    log.warning("%s", exc)
                    await self._flush_then_stop()
                    return
                if received.pong:
                    self._pong.set()
                if self._session.closed is not None:
                    self._die(self._session.closed)
                    return
                for stream in received.requests:
                    nursery.start_soon(self._serve_stream, stream)
            try:
                data = bytes(await self._stream.receive_some(READ_CHUNK))  # bytes(b) is b: no copy
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(ConnectionClosed(f"connection to {self.name} lost: {exc}"))
                return
            if not data:
                self._die(ConnectionClosed(f"{self.name} closed the connection"))
                return

    async def _serve_stream(self, stream: StreamState) -> None:
        assert self._handler is not None and isinstance(stream, H2Stream)
        try:
            await self._handler(stream)
        except (StreamReset, ConnectionClosed):
            pass
        except Exception:
            log.exception("request handler failed on stream %d from %s", stream.id, self.name)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._session.finish(stream)

    async def _close_when_idle(self, timeout: float) -> None:  # noqa: ASYNC109 -- an idle period, not a deadline
        while True:
            idle = self._no_streams
            await idle.wait()
            await trio.sleep(timeout)
            if self._no_streams is idle:  # no stream was opened meanwhile
                log.info("closing the connection of %s: idle for %.0f s", self.name, timeout)
                self.abort()
                return

    async def _keepalive(self) -> None:
        interval = self._settings.keepalive_interval
        assert interval is not None  # started only when set
        while True:
            await trio.sleep(interval)
            self._pong = trio.Event()
            self._session.ping(os.urandom(8))
            with trio.move_on_after(self._settings.keepalive_timeout):
                await self._pong.wait()
            if not self._pong.is_set():
                log.warning(
                    "no PING answer from %s within %.1f s: connection presumed dead",
                    self.name,
                    self._settings.keepalive_timeout,
                )
                self.abort()
                return

    async def _flush_then_stop(self) -> None:
        # The GOAWAY the session queued goes out through the writer, which
        # may be in the middle of a send_all right now: a second writer would
        # get BusyResourceError.  Bounded: the peer may not be reading.
        with trio.move_on_after(1):
            await self._flush()
        self._die(ConnectionClosed(f"protocol error on connection to {self.name}"))

    async def _flush(self) -> None:
        """Wait until the writer has written everything queued so far (or
        the connection died)."""
        # A new event only when the current one is set: another task may be
        # waiting on it, and the writer sets only the current one.
        if self._flushed.is_set() and self._session.closed is None:
            self._flushed = trio.Event()
        self._writer_wakeup.set()
        await self._flushed.wait()

    # -- the session's news --------------------------------------------------------------

    def _session_changed(self) -> None:
        """Something to write, or the table of streams changed."""
        self._writer_wakeup.set()
        if self._session.active_streams:
            # Only when it was set: `aclose_gracefully` may be waiting on the
            # current one, which must be the one set when the last stream goes.
            if self._no_streams.is_set():
                self._no_streams = trio.Event()
        else:
            self._no_streams.set()

    def _die(self, error: ConnectionClosed) -> None:
        self._session.close(error)
        self._no_streams.set()
        self._flushed.set()  # nothing more will be written
        if self._cancel_scope is not None and not self._cancel_scope.cancel_called:
            # Let the reader notice; the writer stops with the nursery.
            self._cancel_scope.cancel()
