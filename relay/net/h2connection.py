"""HTTP/2 on trio: a thin shell around the sans-I/O `h2` state machine.

Theory of operation
-------------------
One `Http2Connection` owns one `h2.connection.H2Connection` and one byte
stream (TLS or plain TCP).  Only this object touches the h2 state machine;
every other task goes through its methods, which change h2's state
synchronously and then wake the connection's single *writer* task.  That
writer is the only code that awaits ``send_all``: a caller that is cancelled
never leaves half a frame on the wire, and a write that fails or is cancelled
kills the whole connection, which is never reused (h11's ``send_failed()``
rule).  A single *reader* task feeds received bytes to h2 and dispatches the
events to per-stream `H2Stream` objects.

Flow control (RFC 9113 §5.2, §6.9): outgoing DATA is cut into chunks of at
most ``min(stream window, max frame size)``; a sender whose window is empty
parks until a WINDOW_UPDATE (stream or connection) or a SETTINGS change wakes
it.  Incoming DATA is acknowledged when the application consumes it, so a
slow consumer pushes back on its peer instead of buffering without bound, or
when it abandons it (reset, handler done): unread DATA still counts against
the connection window, which would otherwise shrink for good.
Both windows start well above h2's 64 KiB default: with the default, a
hundred concurrent uploads on one connection stall for seconds.

Liveness: the connection sends a PING every ``keepalive_interval`` seconds
and declares the peer dead if no acknowledgement comes within
``keepalive_timeout``; a half-open TCP connection (no FIN, no RST) is found
that way.

GOAWAY (§6.8): h2 (up to 4.x at least) moves its whole connection to CLOSED
as soon as a GOAWAY is sent or received, after which it refuses every frame.
So a graceful shutdown writes the GOAWAY frame itself, behind h2's back:
the peer learns that no new stream will be served while the in-flight ones
still get their responses.  A GOAWAY *received* ends the connection at
once: streams above the peer's ``last_stream_id`` fail with
`StreamRefused` (never processed, safe to retry), the others with
`ConnectionClosed` (outcome unknown), which is why the national protocol
makes every request idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# 16 MiB: enough for a hundred concurrent uploads in flight without
# stalling on connection-level flow control, small enough to bound memory.
CONNECTION_WINDOW = 16 * 1024 * 1024
# 1 MiB per stream: a typical message body arrives in a single round trip.
STREAM_WINDOW = 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024
READ_CHUNK = 64 * 1024

# Flood limits, per connection and per FLOOD_WINDOW seconds: control frames
# a peer may make us answer, and streams it may reset (CVE-2023-44487,
# "rapid reset").  Honest peers stay orders of magnitude below.
FLOOD_WINDOW = 10.0
FLOOD_LIMITS = {"reset": 500, "ping": 50, "settings": 50}

# Closed streams whose fate h2 remembers, per connection (h2's own bound is
# 2**16); see `_H2Connection`.
CLOSED_STREAMS_KEPT = 1000


class ConnectionClosed(Exception):
    """The HTTP/2 connection is gone; nothing more can be sent or received on it."""


class StreamReset(Exception):
    """The peer reset this stream (RST_STREAM); its outcome is unknown."""


class StreamRefused(ConnectionClosed):
    """The peer's GOAWAY says this stream was never processed: safe to retry."""


class BodyTooLarge(Exception):
    """A request or response body exceeded the limit given to `read_body`."""


@dataclass(frozen=True)
class Http2Settings:
    """Tunables of one connection; the defaults suit both hub and relay."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 16 * 1024
    keepalive_interval: float | None = 20.0
    keepalive_timeout: float = 10.0
    # How long a graceful close waits for in-flight streams.
    drain_timeout: float = 10.0
    # Close a connection that has had no stream open for this long (a
    # server's defence against clients that hold connections for nothing).
    idle_timeout: float | None = None
    # h2's checks and rewriting of header blocks (RFC 9113 §8.2: characters,
    # pseudo-headers, connection-specific fields), both ways.  They are about
    # a fifth of a small request's CPU on a server; one whose application
    # checks the few fields it reads, and answers only headers it wrote
    # itself in lower case, can do without (the local API does).
    check_headers: bool = True


class H2Stream:
    """One HTTP/2 stream, as seen by the application.

    Received DATA is buffered here and credited back to the peer only when
    `receive_some` hands it to the application.
    """

    def __init__(self, conn: Http2Connection, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        self.headers: Headers | None = None
        self._headers_ready = trio.Event()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._ended = False  # the peer ended its side (END_STREAM received)
        self._sent_end = False  # we ended ours (END_STREAM sent)
        self._error: Exception | None = None
        self._data_ready = trio.Event()
        self._window_open = trio.Event()

    # -- receiving ---------------------------------------------------------

    @property
    def ended(self) -> bool:
        """Whether the peer ended its side: the whole body is buffered here,
        and reading it cannot block."""
        return self._ended

    async def receive_headers(self) -> Headers:
        """Wait for the peer's headers (the response, on a client stream)."""
        await self._headers_ready.wait()
        if self.headers is None:
            assert self._error is not None
            raise self._error
        return self.headers

    async def receive_some(self) -> bytes:
        """All of the body received so far and not read yet (waiting for
        some if there is none); ``b""`` once the peer ended the stream.
        Everything at once lets a reader that commits what it reads (an
        inbox) take one batch per wake-up rather than one per frame."""
        while not self._chunks:
            if self._ended:  # complete, even if a RST_STREAM followed (RFC 9113 §8.1)
                return b""
            if self._error is not None:
                raise self._error
            self._data_ready = trio.Event()
            await self._data_ready.wait()
        if len(self._chunks) == 1:
            data, flow_len = self._chunks.popleft()
        else:
            data, flow_len = b"".join(chunk for chunk, _ in self._chunks), sum(n for _, n in self._chunks)
            self._chunks.clear()
        self._conn._credit(self.id, flow_len)
        return data

    async def read_body(self, limit: int) -> bytes:
        """The whole body; `BodyTooLarge` past ``limit`` bytes.

        The stream is left open so that a server can still answer 413; a
        handler that returns without reading the rest gets the stream reset
        for it (see `Http2Connection._serve_stream`)."""
        body = bytearray()
        while chunk := await self.receive_some():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(f"body larger than {limit} bytes")
        return bytes(body)

    # -- sending -----------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        if self._error is not None:
            raise self._error  # not h2's StreamClosedError
        self._conn._send_headers(self.id, headers, end_stream)

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data``, waiting for flow-control credit as needed."""
        view = memoryview(data)
        while True:
            # Checked first: h2 would raise its own StreamClosedError for a
            # stream the peer (or we) already reset.
            if self._error is not None:
                raise self._error
            window = self._conn._send_window(self.id)
            if window > 0 or not view:
                chunk, view = view[:window], view[window:]
                self._conn._send_data(self.id, bytes(chunk), end_stream and not view)
                if not view:
                    return
                continue  # park only when the window is empty, not after every chunk
            self._window_open = trio.Event()
            await self._window_open.wait()

    async def send_response(self, status: int, headers: Headers, body: bytes) -> None:
        self.send_headers([(b":status", str(status).encode()), *headers], end_stream=not body)
        if body:
            await self.send_data(body, end_stream=True)

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the stream; safe to call more than once."""
        if self._error is None:
            self._fail(StreamReset(f"stream {self.id} reset locally"))
            self._conn._reset(self.id, code)
        # Even when the peer reset it first: whatever was received but never
        # read is dropped, and given back to the connection window.
        self._drop_unread()

    def _drop_unread(self) -> None:
        """Credit buffered DATA nobody will read: it still counts against the
        connection window, which would otherwise shrink for good."""
        while self._chunks:
            self._conn._credit(self.id, self._chunks.popleft()[1])

    # -- called by the connection --------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._headers_ready.set()
        self._data_ready.set()
        self._window_open.set()


Handler = Callable[[H2Stream], Awaitable[None]]


class _H2Connection(h2.connection.H2Connection):
    """h2's state machine, remembering the last `CLOSED_STREAMS_KEPT`
    closed streams instead of 2**16.

    h2 records how each closed stream ended only to answer a HEADERS frame
    that arrives after it reset the stream (a stream error, not the end of
    the connection); DATA, WINDOW_UPDATE and RST_STREAM on a stream it has
    forgotten it tolerates anyway.  Such a frame left the peer before our
    RST_STREAM reached it, within a round trip, while far fewer streams
    close.  At over 100 bytes a stream, 2**16 is 7-8 MiB per connection,
    and the long-lived ones (the uplink, the hub's, a vendor's pooled
    connection to the local API) open a stream every message or two: over
    a 10-minute soak at 200 msg/s relay A grew by 30 MiB, the hub by 10."""

    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


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
        self._client = client
        self._settings = settings
        self._initial_data = initial_data
        self.name = name
        check = settings.check_headers
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=check,
            normalize_inbound_headers=check,
            validate_outbound_headers=check,
            normalize_outbound_headers=check,
        )
        self._h2 = _H2Connection(config=config)
        self._streams: dict[int, H2Stream] = {}
        self._writer_wakeup = trio.Event()
        self._flushed = trio.Event()  # set by the writer when it runs out of bytes
        self._outbound = bytearray()  # frames written behind h2's back: GOAWAY
        self._pong = trio.Event()
        self._closed: ConnectionClosed | None = None
        self._goaway_sent = False
        self._no_streams = trio.Event()
        self._no_streams.set()
        self._cancel_scope: trio.CancelScope | None = None
        self._flood_guard = _FloodGuard()

    @property
    def is_open(self) -> bool:
        return self._closed is None and not self._goaway_sent

    @property
    def active_streams(self) -> int:
        return len(self._streams)

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
        self._h2.local_settings = h2.settings.Settings(
            client=self._client,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._settings.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._settings.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 copies these two out of the settings when it is constructed;
        # settings set before the preface are in force at once, so follow.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.decoder.max_header_list_size = self._settings.max_header_list_size
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                self._cancel_scope = nursery.cancel_scope
                self._handler_nursery = nursery
                self._handler = handler
                nursery.start_soon(self._writer)
                if self._settings.keepalive_interval:
                    nursery.start_soon(self._keepalive)
                if self._settings.idle_timeout:
                    nursery.start_soon(self._close_when_idle, self._settings.idle_timeout)
                task_status.started()
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._die(ConnectionClosed(f"connection to {self.name} closed"))
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._stream.aclose()

    # -- client side -----------------------------------------------------------

    def open_stream(self, headers: Headers, *, end_stream: bool = False) -> H2Stream:
        """Start a request; the caller sends its body and reads the response."""
        if self._closed is not None:
            raise self._closed
        if not self.is_open:
            raise StreamRefused(f"connection to {self.name} is shutting down")
        stream_id = self._h2.get_next_available_stream_id()
        stream = self._track(stream_id)
        self._send_headers(stream_id, headers, end_stream)
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
                    if not stream._ended:
                        raise
            headers = await stream.receive_headers()
            return status_of(headers), await stream.read_body(limit)
        finally:
            stream.reset()  # no-op when the stream completed

    # -- shutdown ----------------------------------------------------------------

    def send_goaway(self) -> None:
        """Refuse new streams from now on (GOAWAY); the ones in flight go on.

        The frame is written without telling h2, which would otherwise
        refuse to send the in-flight responses (see the module docstring)."""
        if self._closed is None and not self._goaway_sent:
            self._goaway_sent = True
            frame = hyperframe.frame.GoAwayFrame(0)
            frame.last_stream_id = self._h2.highest_inbound_stream_id
            frame.error_code = h2.errors.ErrorCodes.NO_ERROR
            self._outbound += self._h2.data_to_send() + frame.serialize()
            self._kick()

    async def aclose_gracefully(self) -> None:
        """GOAWAY, let in-flight streams finish (bounded), then close."""
        self.send_goaway()
        with trio.move_on_after(self._settings.drain_timeout):
            await self._no_streams.wait()
            # The last answers are queued in h2, not yet written.
            await self._flush()
        self.abort()

    def abort(self) -> None:
        """Close now: `run` returns and every open stream fails."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self._die(ConnectionClosed(f"connection to {self.name} closed"))

    # -- the two tasks -------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            data = bytes(self._outbound) + self._h2.data_to_send()
            self._outbound.clear()
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._die(ConnectionClosed(f"connection to {self.name} lost: {exc}"))
                    self._cancel_scope.cancel()
                    return
            else:
                self._flushed.set()  # everything queued so far is written
                self._writer_wakeup = trio.Event()
                await self._writer_wakeup.wait()

    async def _reader(self) -> None:
        data = self._initial_data
        while True:
            if data:
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.warning("HTTP/2 protocol error from %s: %s", self.name, exc)
                    await self._flush_then_stop()
                    return
                for event in events:
                    self._dispatch(event)
                    if flood := self._flood_guard.exceeded(event):
                        log.warning("%s floods the connection (%s): closing it", self.name, flood)
                        self._h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                        await self._flush_then_stop()
                        return
                self._kick()
                if self._closed is not None:
                    return
            try:
                data = await self._stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(ConnectionClosed(f"connection to {self.name} lost: {exc}"))
                return
            if not data:
                self._die(ConnectionClosed(f"{self.name} closed the connection"))
                return

    async def _close_when_idle(self, timeout: float) -> None:
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
        while True:
            await trio.sleep(interval)
            self._pong = trio.Event()
            self._h2.ping(os.urandom(8))
            self._kick()
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
        # The GOAWAY h2 queued goes out through the writer, which may be in
        # the middle of a send_all right now: a second writer would get
        # BusyResourceError.  Bounded: the peer may not be reading.
        with trio.move_on_after(1):
            await self._flush()
        self._die(ConnectionClosed(f"protocol error on connection to {self.name}"))

    async def _flush(self) -> None:
        """Wait until the writer has written everything queued so far (or
        the connection died)."""
        # A new event only when the current one is set: another task may be
        # waiting on it, and the writer sets only the current one.
        if self._flushed.is_set() and self._closed is None:
            self._flushed = trio.Event()
        self._kick()
        await self._flushed.wait()

    # -- event dispatch ----------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.headers = list(event.headers)
                stream._headers_ready.set()
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None or stream._error is not None:
                self._credit(event.stream_id, event.flow_controlled_length)
            else:
                stream._chunks.append((event.data, event.flow_controlled_length))
                stream._data_ready.set()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._ended = True
                stream._data_ready.set()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(StreamReset(f"stream {event.stream_id} reset by {self.name} ({event.error_code!r})"))
                self._update_no_streams()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._open_all_windows()
            elif (stream := self._streams.get(event.stream_id)) is not None:
                stream._window_open.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._open_all_windows()
        elif isinstance(event, h2.events.PingAckReceived):
            self._pong.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream = self._track(event.stream_id)
        stream.headers = list(event.headers)
        stream._headers_ready.set()
        if self._handler is None or self._goaway_sent:
            stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._handler_nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: H2Stream) -> None:
        try:
            await self._handler(stream)
        except (StreamReset, ConnectionClosed):
            pass
        except Exception:
            log.exception("request handler failed on stream %d from %s", stream.id, self.name)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            if not (stream._ended and stream._sent_end):
                # The handler is done, the stream is not.  Answered before the
                # request body was complete (e.g. 413): ask the client to stop
                # sending (RFC 9113 §8.1).  Not answered at all: nobody ever
                # will, so fail the stream rather than leave the client waiting.
                code = h2.errors.ErrorCodes.NO_ERROR if stream._sent_end else h2.errors.ErrorCodes.INTERNAL_ERROR
                stream.reset(code)
            stream._drop_unread()  # a body the handler left unread
            self._forget_if_done(stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        if event.error_code:
            log.warning("%s sent GOAWAY with error %r", self.name, event.error_code)
        last = event.last_stream_id or 0
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last:
                stream._fail(StreamRefused(f"stream {stream_id} refused by {self.name}'s GOAWAY"))
        self._die(ConnectionClosed(f"{self.name} closed the connection (GOAWAY)"))

    # -- helpers used by H2Stream ------------------------------------------------

    def _track(self, stream_id: int) -> H2Stream:
        stream = H2Stream(self, stream_id)
        self._streams[stream_id] = stream
        # Only when it was set: `aclose_gracefully` may be waiting on the
        # current one, which must be the one set when the last stream goes.
        if self._no_streams.is_set():
            self._no_streams = trio.Event()
        return stream

    def _send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self._check_open()
        with self._h2_refusals(stream_id):
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        self._kick()
        if end_stream:
            self._ended_locally(stream_id)

    def _send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._check_open()
        with self._h2_refusals(stream_id):
            self._h2.send_data(stream_id, data, end_stream=end_stream)
        self._kick()
        if end_stream:
            self._ended_locally(stream_id)

    @contextlib.contextmanager
    def _h2_refusals(self, stream_id: int) -> Iterator[None]:
        """h2's refusals to send, in our terms: a stream gone, or a
        connection h2 already considers closed (a GOAWAY in the same read)."""
        try:
            yield
        except h2.exceptions.StreamClosedError:
            raise StreamReset(f"stream {stream_id} is closed") from None
        except h2.exceptions.ProtocolError:
            raise ConnectionClosed(f"connection to {self.name} is closing") from None

    def _send_window(self, stream_id: int) -> int:
        self._check_open()
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, KeyError):
            raise StreamReset(f"stream {stream_id} is closed") from None
        return min(window, self._h2.max_outbound_frame_size)

    def _reset(self, stream_id: int, code: int) -> None:
        self._streams.pop(stream_id, None)
        self._update_no_streams()
        if self._closed is None:
            try:
                self._h2.reset_stream(stream_id, error_code=code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                return  # already closed, or the whole connection is
            self._kick()

    def _credit(self, stream_id: int, flow_len: int) -> None:
        if flow_len and self._closed is None:
            try:
                self._h2.acknowledge_received_data(flow_len, stream_id)
            except h2.exceptions.StreamClosedError:
                self._h2.increment_flow_control_window(flow_len)
            self._kick()

    def _ended_locally(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._sent_end = True
            self._forget_if_done(stream)

    def _forget_if_done(self, stream: H2Stream) -> None:
        # Both sides ended, by our own account.  Not by h2's stream state: it
        # already reflects the whole batch of frames being dispatched, e.g. a
        # RST_STREAM right behind an END_STREAM, whose event must still find
        # the stream (and wake a sender parked on it).
        if stream._ended and stream._sent_end:
            self._streams.pop(stream.id, None)
            self._update_no_streams()

    def _update_no_streams(self) -> None:
        if not self._streams:
            self._no_streams.set()

    def _open_all_windows(self) -> None:
        for stream in self._streams.values():
            stream._window_open.set()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _kick(self) -> None:
        self._writer_wakeup.set()

    def _die(self, error: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = error
            for stream in self._streams.values():
                stream._fail(error)
            self._streams.clear()
            self._no_streams.set()
            self._flushed.set()  # nothing more will be written
            if self._cancel_scope is not None and not self._cancel_scope.cancel_called:
                # Let the reader notice; the writer stops with the nursery.
                self._cancel_scope.cancel()


class _FloodGuard:
    """Counts what a peer makes us do for nothing, in fixed windows."""

    _KINDS = {
        h2.events.StreamReset: "reset",
        h2.events.PingReceived: "ping",
        h2.events.RemoteSettingsChanged: "settings",
    }

    def __init__(self) -> None:
        self._window_start = -math.inf
        self._counts: dict[str, int] = {}

    def exceeded(self, event: h2.events.Event) -> str | None:
        kind = self._KINDS.get(type(event))
        if kind is None:
            return None
        now = trio.current_time()
        if now - self._window_start > FLOOD_WINDOW:
            self._window_start, self._counts = now, {}
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if self._counts[kind] > FLOOD_LIMITS[kind]:
            return f"more than {FLOOD_LIMITS[kind]} {kind} frames in {FLOOD_WINDOW:g} s"
        return None


def status_of(headers: Headers) -> int:
    """The response's status; a peer that sends none, or nonsense, has
    broken the exchange (`StreamReset`, which callers already handle)."""
    for name, value in headers:
        if name == b":status" and value.isdigit() and len(value) == 3:
            return int(value)
    raise StreamReset("response without a valid :status")


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


__all__ = [
    "BodyTooLarge",
    "ConnectionClosed",
    "H2Stream",
    "Headers",
    "Http2Connection",
    "Http2Settings",
    "StreamRefused",
    "StreamReset",
    "header",
    "status_of",
]
