"""HTTP/2 session logic without I/O: bytes in, streams and bytes out.

Theory of operation
-------------------
`H2Session` owns one `h2` state machine and the table of open streams.  It
is fed what the peer sent (`receive_data`, with the current time for the
flood guard) and says which requests that opened; everything it has to
write accumulates until the shell takes it (`data_to_send`).  It never
waits: a sender whose flow-control window is empty learns so from
`send_window` and parks in the shell; whatever a stream's waiters wait for
(headers, body, window, failure) calls that stream's `StreamState.wake`,
which the shell overrides.  `on_change` tells the shell that there is
something to write or that the table of streams changed.

Flow control (RFC 9113 §5.2, §6.9): outgoing DATA is cut into chunks of at
most ``min(stream window, max frame size)``.  Incoming DATA is acknowledged
when the application reads it, so a slow consumer pushes back on its peer
instead of buffering without bound, or when it abandons it (reset, handler
done): unread DATA still counts against the connection window, which would
otherwise shrink for good.  Both windows start well above h2's 64 KiB
default: with the default, a hundred concurrent uploads on one connection
stall for seconds.

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

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# 16 MiB: enough for a hundred concurrent uploads in flight without
# stalling on connection-level flow control, small enough to bound memory.
CONNECTION_WINDOW = 16 * 1024 * 1024
# 1 MiB per stream: a typical message body arrives in a single round trip.
STREAM_WINDOW = 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024

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


class PeerMisbehaved(Exception):
    """The peer broke the protocol or flooded the connection: the GOAWAY
    saying so is queued, and the connection must end once it is written."""


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


class StreamState:
    """One stream's state: the peer's headers, the body received and not
    read yet, which sides ended, and why it failed.

    The session changes it as frames arrive and go; the shell subclasses it
    to add waiting (`wake`)."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.headers: Headers | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._ended = False  # the peer ended its side (END_STREAM received)
        self._sent_end = False  # we ended ours (END_STREAM sent)
        self._error: Exception | None = None

    @property
    def ended(self) -> bool:
        """Whether the peer ended its side: the whole body is buffered here,
        and reading it cannot block."""
        return self._ended

    @property
    def sent_end(self) -> bool:
        """Whether we ended our side (the whole answer or request is queued)."""
        return self._sent_end

    @property
    def error(self) -> Exception | None:
        """Why the stream failed (reset by either side, connection gone), if it did."""
        return self._error

    @property
    def has_data(self) -> bool:
        return bool(self._chunks)

    def wake(self) -> None:
        """Something a waiter on this stream may wait for happened: headers,
        DATA, the end of the body, window, a failure.  The shell's hook."""

    # -- called by the session --------------------------------------------------

    def headers_received(self, headers: Headers) -> None:
        self.headers = headers
        self.wake()

    def data_received(self, data: bytes, flow_len: int) -> None:
        self._chunks.append((data, flow_len))
        self.wake()

    def end_received(self) -> None:
        self._ended = True
        self.wake()

    def end_sent(self) -> None:
        self._sent_end = True

    def fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self.wake()

    def take_data(self) -> tuple[bytes, int]:
        """Everything buffered, and its flow-controlled length to credit."""
        if len(self._chunks) == 1:
            return self._chunks.popleft()
        data, flow_len = b"".join(chunk for chunk, _ in self._chunks), sum(n for _, n in self._chunks)
        self._chunks.clear()
        return data, flow_len


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

    @property
    def closed_streams_kept(self) -> int:
        return len(self._closed_streams)


@dataclass
class Received:
    """What one `H2Session.receive_data` brought: the requests it opened, in
    the order they came, and whether a PING acknowledgement came."""

    requests: list[StreamState] = field(default_factory=list)
    pong: bool = False


class H2Session:
    """The sans-I/O side of one HTTP/2 connection, client or server.

    Error handling: once `close` was called (the transport died, the peer
    sent GOAWAY, the shell gave up), every open stream has failed with that
    error and every later call that would send raises it."""

    def __init__(
        self,
        *,
        client: bool,
        settings: Http2Settings = Http2Settings(),
        name: str = "peer",
        stream_class: Callable[[H2Session, int], StreamState] = lambda session, stream_id: StreamState(stream_id),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self._client = client
        self._settings = settings
        self._new_stream = stream_class
        self._on_change = on_change
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
        self._streams: dict[int, StreamState] = {}
        self._outbound = bytearray()  # frames written behind h2's back: GOAWAY
        self._closed: ConnectionClosed | None = None
        self._goaway_sent = False
        self._serving = False
        self._flood_guard = FloodGuard()

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection ended, or None while it lives."""
        return self._closed

    @property
    def is_open(self) -> bool:
        return self._closed is None and not self._goaway_sent

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def closed_streams_kept(self) -> int:
        """How many closed streams h2 remembers right now (at most `CLOSED_STREAMS_KEPT`)."""
        return self._h2.closed_streams_kept

    def start(self, *, serving: bool) -> None:
        """Queue the preface and our settings; ``serving``: whether requests
        from the peer are served (otherwise they are refused)."""
        self._serving = serving
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
        self._on_change()

    def data_to_send(self) -> bytes:
        data = bytes(self._outbound) + self._h2.data_to_send() if self._outbound else self._h2.data_to_send()
        self._outbound.clear()
        return data

    # -- receiving -----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> Received:
        """Feed what the peer sent.  `PeerMisbehaved` when the connection
        must end (the GOAWAY saying why is queued); check `closed` after."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._on_change()
            raise PeerMisbehaved(f"HTTP/2 protocol error from {self.name}: {exc}") from None
        received = Received()
        for event in events:
            self._dispatch(event, received)
            if flood := self._flood_guard.exceeded(event, now):
                self._h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                self._on_change()
                raise PeerMisbehaved(f"{self.name} floods the connection ({flood}): closing it")
        self._on_change()
        return received

    def _dispatch(self, event: h2.events.Event, received: Received) -> None:
        stream: StreamState | None
        if isinstance(event, h2.events.RequestReceived):
            stream = self._track(event.stream_id)
            stream.headers_received(list(event.headers))
            if self._serving and not self._goaway_sent:
                received.requests.append(stream)
            else:
                self.reset(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None or stream.error is not None:
                self._credit(event.stream_id, event.flow_controlled_length)
            else:
                stream.data_received(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.end_received()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.headers_received(list(event.headers))
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self._streams.pop(event.stream_id, None)) is not None:
                stream.fail(StreamReset(f"stream {event.stream_id} reset by {self.name} ({event.error_code!r})"))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._open_all_windows()
            elif (stream := self._streams.get(event.stream_id)) is not None:
                stream.wake()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._open_all_windows()
        elif isinstance(event, h2.events.PingAckReceived):
            received.pong = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        if event.error_code:
            log.warning("%s sent GOAWAY with error %r", self.name, event.error_code)
        last = event.last_stream_id or 0
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last:
                stream.fail(StreamRefused(f"stream {stream_id} refused by {self.name}'s GOAWAY"))
        self.close(ConnectionClosed(f"{self.name} closed the connection (GOAWAY)"))

    # -- sending -------------------------------------------------------------------

    def open_stream(self, headers: Headers, *, end_stream: bool = False) -> StreamState:
        """Start a request (client side)."""
        if self._closed is not None:
            raise self._closed
        if self._goaway_sent:
            raise StreamRefused(f"connection to {self.name} is shutting down")
        stream = self._track(self._h2.get_next_available_stream_id())
        self.send_headers(stream, headers, end_stream=end_stream)
        return stream

    def send_headers(self, stream: StreamState, headers: Headers, *, end_stream: bool = False) -> None:
        self._check_sendable(stream)
        try:
            self._h2.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise self._refusal(stream, exc) from None
        if end_stream:
            self._ended_locally(stream)
        self._on_change()

    def send_window(self, stream: StreamState) -> int:
        """How many bytes of DATA may go out on ``stream`` now, in one frame."""
        self._check_sendable(stream)
        try:
            window = self._h2.local_flow_control_window(stream.id)
        except (h2.exceptions.StreamClosedError, KeyError):
            raise StreamReset(f"stream {stream.id} is closed") from None
        return min(window, self._h2.max_outbound_frame_size)

    def send_data(self, stream: StreamState, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data``: at most `send_window` bytes."""
        self._check_sendable(stream)
        try:
            self._h2.send_data(stream.id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise self._refusal(stream, exc) from None
        if end_stream:
            self._ended_locally(stream)
        self._on_change()

    def read(self, stream: StreamState) -> bytes:
        """Everything buffered on ``stream`` (``b""`` if nothing is), credited
        back to the peer: it may send as much again."""
        if not stream.has_data:
            return b""
        data, flow_len = stream.take_data()
        self._credit(stream.id, flow_len)
        return data

    def reset(self, stream: StreamState, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon ``stream``; safe to call more than once."""
        if stream.error is None:
            stream.fail(StreamReset(f"stream {stream.id} reset locally"))
            self._streams.pop(stream.id, None)
            if self._closed is None:
                try:
                    self._h2.reset_stream(stream.id, error_code=code)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass  # already closed, or the whole connection is
        # Even when the peer reset it first: whatever was received but never
        # read is dropped, and given back to the connection window.
        self._drop_unread(stream)
        self._on_change()

    def finish(self, stream: StreamState) -> None:
        """The server's handler of ``stream`` is done, whatever the stream's state.

        Answered before the request body was complete (e.g. 413): ask the
        client to stop sending (RFC 9113 §8.1).  Not answered at all: nobody
        ever will, so fail the stream rather than leave the client waiting.
        A body left unread is credited back."""
        if not (stream.ended and stream.sent_end):
            self.reset(stream,
                       h2.errors.ErrorCodes.NO_ERROR if stream.sent_end else h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._drop_unread(stream)
        self._forget_if_done(stream)

    def ping(self, opaque_data: bytes) -> None:
        self._h2.ping(opaque_data)
        self._on_change()

    def send_goaway(self) -> None:
        """Refuse new streams from now on (GOAWAY); the ones in flight go on.

        The frame is written without telling h2, which would otherwise
        refuse to send the in-flight responses (see the module docstring)."""
        if self._closed is None and not self._goaway_sent:
            self._goaway_sent = True
            self._outbound += self._h2.data_to_send() + goaway_frame(self._h2.highest_inbound_stream_id)
            self._on_change()

    def close(self, error: ConnectionClosed) -> None:
        """The connection is gone: every open stream fails with ``error``."""
        if self._closed is None:
            self._closed = error
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                stream.fail(error)
            self._on_change()

    # -- the table of streams ------------------------------------------------------------

    def _track(self, stream_id: int) -> StreamState:
        stream = self._new_stream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    def _ended_locally(self, stream: StreamState) -> None:
        stream.end_sent()
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: StreamState) -> None:
        # Both sides ended, by our own account.  Not by h2's stream state: it
        # already reflects the whole batch of frames being dispatched, e.g. a
        # RST_STREAM right behind an END_STREAM, whose event must still find
        # the stream (and wake a sender parked on it).
        if stream.ended and stream.sent_end and self._streams.pop(stream.id, None) is not None:
            self._on_change()

    def _open_all_windows(self) -> None:
        for stream in list(self._streams.values()):
            stream.wake()

    def _drop_unread(self, stream: StreamState) -> None:
        """Credit buffered DATA nobody will read: it still counts against the
        connection window, which would otherwise shrink for good."""
        if stream.has_data:
            self._credit(stream.id, stream.take_data()[1])

    def _credit(self, stream_id: int, flow_len: int) -> None:
        if flow_len and self._closed is None:
            try:
                self._h2.acknowledge_received_data(flow_len, stream_id)
            except h2.exceptions.StreamClosedError:
                self._h2.increment_flow_control_window(flow_len)
            self._on_change()

    def _check_sendable(self, stream: StreamState) -> None:
        # Checked first: h2 would raise its own StreamClosedError for a
        # stream the peer (or we) already reset.
        if stream.error is not None:
            raise stream.error
        if self._closed is not None:
            raise self._closed

    def _refusal(self, stream: StreamState, exc: h2.exceptions.ProtocolError) -> Exception:
        """h2's refusal to send, in our terms: a stream gone, or a connection
        h2 already considers closed (a GOAWAY in the same read)."""
        if isinstance(exc, h2.exceptions.StreamClosedError):
            return StreamReset(f"stream {stream.id} is closed")
        return ConnectionClosed(f"connection to {self.name} is closing")


def goaway_frame(last_stream_id: int) -> bytes:
    """A GOAWAY(NO_ERROR) frame: no stream above ``last_stream_id`` will be served."""
    frame = hyperframe.frame.GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = h2.errors.ErrorCodes.NO_ERROR
    return frame.serialize()


class FloodGuard:
    """Counts what a peer makes us do for nothing, in fixed windows of
    `FLOOD_WINDOW` seconds of the caller's clock."""

    _KINDS: ClassVar[dict[type[h2.events.Event], str]] = {
        h2.events.StreamReset: "reset",
        h2.events.PingReceived: "ping",
        h2.events.RemoteSettingsChanged: "settings",
    }

    def __init__(self) -> None:
        self._window_start = -math.inf
        self._counts: dict[str, int] = {}

    def exceeded(self, event: h2.events.Event, now: float) -> str | None:
        """Count ``event``; what was exceeded, if anything."""
        kind = self._KINDS.get(type(event))
        if kind is None:
            return None
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
