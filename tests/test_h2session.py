"""The sans-I/O HTTP/2 session (`relay.core.h2session`): bytes in, streams and bytes out.

The peer is a real h2 state machine; what it sends is fed to an
`H2Session` and what the session queues is fed back to it, so every
assertion is about frames as a real peer sees them.  No trio, no sockets,
no clock: the flood guard is given its times.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from relay.core.h2session import (
    CLOSED_STREAMS_KEPT,
    CONNECTION_WINDOW,
    FLOOD_LIMITS,
    FLOOD_WINDOW,
    MAX_FRAME_SIZE,
    STREAM_WINDOW,
    ConnectionClosed,
    FloodGuard,
    H2Session,
    Http2Settings,
    PeerMisbehaved,
    StreamRefused,
    StreamReset,
    StreamState,
    header,
    status_of,
)


class Recording(StreamState):
    """A stream that counts how often its waiters would have been woken."""

    def __init__(self, session: H2Session, stream_id: int) -> None:
        super().__init__(stream_id)
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def peer(client: bool = True) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
    conn.initiate_connection()
    return conn


def request(path: str = "/v1/messages", method: str = "POST") -> list[tuple[bytes, bytes]]:
    return [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", b"relay"), (b":path", path.encode())]


class Server:
    """An `H2Session` serving requests, with a real h2 client facing it."""

    def __init__(self, settings: Http2Settings = Http2Settings(), *, serving: bool = True) -> None:
        self.changes = 0
        self.session = H2Session(client=False, settings=settings, name="client", stream_class=Recording,
                                 on_change=self._changed)
        self.session.start(serving=serving)
        self.client = peer()
        self.now = 0.0

    def _changed(self) -> None:
        self.changes += 1

    def send(self) -> list[Recording]:
        """What the client queued, to the session; the requests it opened."""
        return self.session.receive_data(self.client.data_to_send(), self.now).requests

    def reply(self) -> list[h2.events.Event]:
        """What the session queued, to the client; the events it raised there."""
        return self.client.receive_data(self.session.data_to_send())

    def handshake(self) -> None:
        self.send()
        self.reply()
        self.send()  # the client's SETTINGS ACK


def of(kind: type, events: list[h2.events.Event]) -> list:
    return [e for e in events if isinstance(e, kind)]


# -- requests and responses ------------------------------------------------------------


def test_a_whole_request_in_one_read_and_its_response() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=False)
    server.client.send_data(1, b"hello", end_stream=True)
    [stream] = server.send()
    assert (stream.id, header(stream.headers, b":path"), stream.ended) == (1, b"/v1/messages", True)
    assert server.session.read(stream) == b"hello"
    assert server.session.read(stream) == b""
    server.session.send_headers(stream, [(b":status", b"202")])
    server.session.send_data(stream, b"ok", end_stream=True)
    assert server.session.active_streams == 0
    events = server.reply()
    [response] = of(h2.events.ResponseReceived, events)
    assert status_of(response.headers) == 202
    assert [e.data for e in of(h2.events.DataReceived, events)] == [b"ok"]
    assert [e.stream_id for e in of(h2.events.StreamEnded, events)] == [1]


def test_a_body_that_comes_in_later_reads_wakes_its_stream() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=False)
    [stream] = server.send()
    assert not stream.ended and not stream.has_data
    wakes = stream.wakes
    server.client.send_data(1, b"part one ")
    assert server.send() == []  # no new request: the same stream goes on
    assert stream.wakes == wakes + 1 and not stream.ended
    server.client.send_data(1, b"part two", end_stream=True)
    server.send()
    assert stream.ended and server.session.read(stream) == b"part one part two"


def test_requests_are_refused_when_not_serving() -> None:
    server = Server(serving=False)
    server.handshake()
    server.client.send_headers(1, request(), end_stream=True)
    assert server.send() == []
    [reset] = of(h2.events.StreamReset, server.reply())
    assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.REFUSED_STREAM)
    assert server.session.active_streams == 0


def test_the_table_of_streams_and_on_change() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=True)
    server.client.send_headers(3, request("/healthz", "GET"), end_stream=True)
    first, second = server.send()
    assert server.session.active_streams == 2
    before = server.changes
    server.session.send_headers(first, [(b":status", b"200")], end_stream=True)
    assert server.session.active_streams == 1 and server.changes > before
    server.session.finish(second)  # the handler returned without answering
    assert server.session.active_streams == 0
    assert isinstance(second.error, StreamReset)
    [reset] = of(h2.events.StreamReset, server.reply())
    assert (reset.stream_id, reset.error_code) == (3, h2.errors.ErrorCodes.INTERNAL_ERROR)


def test_an_answer_before_the_whole_body_resets_with_no_error() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=False)
    server.client.send_data(1, b"x" * 1000)
    [stream] = server.send()
    server.session.send_headers(stream, [(b":status", b"413")], end_stream=True)
    server.session.finish(stream)
    events = server.reply()
    assert status_of(of(h2.events.ResponseReceived, events)[0].headers) == 413
    [reset] = of(h2.events.StreamReset, events)
    assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR


def test_a_closed_stream_cannot_send_and_says_why() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=False)
    [stream] = server.send()
    server.client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    server.send()
    assert isinstance(stream.error, StreamReset) and server.session.active_streams == 0
    with pytest.raises(StreamReset):
        server.session.send_headers(stream, [(b":status", b"200")])
    with pytest.raises(StreamReset):
        server.session.send_window(stream)


# -- flow control -----------------------------------------------------------------------


def send_body(client: h2.connection.H2Connection, stream_id: int, size: int) -> None:
    for _ in range(size // MAX_FRAME_SIZE):
        client.send_data(stream_id, b"b" * MAX_FRAME_SIZE)


def window_updates(events: list[h2.events.Event]) -> dict[int, int]:
    updates: dict[int, int] = {}
    for event in of(h2.events.WindowUpdated, events):
        updates[event.stream_id] = updates.get(event.stream_id, 0) + event.delta
    return updates


def test_data_is_credited_when_read_not_when_received() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=False)
    send_body(server.client, 1, STREAM_WINDOW)
    [stream] = server.send()
    assert window_updates(server.reply()) == {}
    assert server.client.local_flow_control_window(1) == 0  # the client must wait
    assert len(server.session.read(stream)) == STREAM_WINDOW
    assert window_updates(server.reply()) == {1: STREAM_WINDOW}


# Half the connection window in whole stream windows: h2 announces
# connection credit in steps that large, so nothing less shows on the wire.
ABANDONED = CONNECTION_WINDOW // STREAM_WINDOW // 2


def test_unread_bodies_are_credited_when_the_handler_is_done() -> None:
    server = Server()
    server.handshake()
    for n in range(ABANDONED):
        server.client.send_headers(2 * n + 1, request(), end_stream=False)
        send_body(server.client, 2 * n + 1, STREAM_WINDOW)
    streams = server.send()
    assert window_updates(server.reply()) == {}
    for stream in streams:
        server.session.send_headers(stream, [(b":status", b"400")], end_stream=True)
        server.session.finish(stream)
    assert window_updates(server.reply()) == {0: ABANDONED * STREAM_WINDOW}


def test_data_for_a_reset_stream_is_credited_at_once() -> None:
    server = Server()
    server.handshake()
    for n in range(ABANDONED):
        server.client.send_headers(2 * n + 1, request(), end_stream=False)
    for stream in server.send():
        server.session.reset(stream)
    for n in range(ABANDONED):  # already in flight when our RST_STREAM left
        send_body(server.client, 2 * n + 1, STREAM_WINDOW)
    server.send()
    assert window_updates(server.reply()) == {0: ABANDONED * STREAM_WINDOW}


def test_the_send_window_is_the_smaller_of_stream_window_and_frame_size() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request("/big", "GET"), end_stream=True)
    [stream] = server.send()
    # The client's defaults: a 65,535-byte window, 16 KiB frames.
    assert server.session.send_window(stream) == 16384
    server.session.send_headers(stream, [(b":status", b"200")])
    for _ in range(3):
        server.session.send_data(stream, b"d" * 16384)
    assert server.session.send_window(stream) == 65535 - 3 * 16384
    server.session.send_data(stream, b"d" * (65535 - 3 * 16384))
    assert server.session.send_window(stream) == 0
    server.client.receive_data(server.session.data_to_send())
    server.client.increment_flow_control_window(100, stream_id=1)
    server.client.increment_flow_control_window(100)
    wakes = stream.wakes
    server.send()
    assert stream.wakes > wakes and server.session.send_window(stream) == 100


# -- GOAWAY ---------------------------------------------------------------------------------


def test_goaway_sent_refuses_new_streams_and_lets_the_others_finish() -> None:
    server = Server()
    server.handshake()
    server.client.send_headers(1, request(), end_stream=True)
    [stream] = server.send()
    server.session.send_goaway()
    assert not server.session.is_open
    [goaway] = of(h2.events.ConnectionTerminated, server.reply())
    assert (goaway.last_stream_id, goaway.error_code) == (1, h2.errors.ErrorCodes.NO_ERROR)
    # A request the client sent before it saw the GOAWAY (its h2 would
    # refuse to send it now, so a second client state machine encodes it).
    late = peer()
    late.send_headers(3, request(), end_stream=True)
    late_frames = late.data_to_send()
    headers_frame = late_frames[late_frames.index(b"\x01\x05\x00\x00\x00\x03") - 3:]
    assert server.session.receive_data(headers_frame, 0.0).requests == []
    server.session.send_headers(stream, [(b":status", b"202")], end_stream=True)
    assert b"\x03\x00\x00\x00\x00\x03\x00\x00\x00\x07" in server.session.data_to_send()  # RST_STREAM(3, REFUSED)


def test_goaway_received_fails_streams_refused_above_last_stream_id() -> None:
    client = H2Session(client=True, name="hub", stream_class=Recording)
    client.start(serving=False)
    hub = peer(client=False)
    hub.receive_data(client.data_to_send())
    client.receive_data(hub.data_to_send(), 0.0)
    first = client.open_stream(request(), end_stream=True)
    second = client.open_stream(request(), end_stream=True)
    hub.receive_data(client.data_to_send())
    hub.close_connection(last_stream_id=1)
    client.receive_data(hub.data_to_send(), 0.0)
    assert isinstance(client.closed, ConnectionClosed)
    assert type(first.error) is ConnectionClosed and type(second.error) is StreamRefused
    assert first.wakes and second.wakes
    with pytest.raises(ConnectionClosed):
        client.open_stream(request())


def test_a_protocol_error_queues_a_goaway() -> None:
    server = Server()
    server.handshake()
    with pytest.raises(PeerMisbehaved, match="protocol error"):
        server.session.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", 0.0)  # DATA on stream 0
    [goaway] = of(h2.events.ConnectionTerminated, server.reply())
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


# -- the flood guard, with explicit times --------------------------------------------------------


def new(kind: type[h2.events.Event]) -> h2.events.Event:
    """An event of that kind; the guard looks at nothing but its type."""
    return kind.__new__(kind)


def test_flood_guard_counts_in_fixed_windows() -> None:
    guard = FloodGuard()
    ping = new(h2.events.PingReceived)
    limit = FLOOD_LIMITS["ping"]
    assert [guard.exceeded(ping, 100.0) for _ in range(limit)] == [None] * limit
    assert guard.exceeded(new(h2.events.DataReceived), 100.0) is None  # not counted
    assert guard.exceeded(ping, 100.0 + FLOOD_WINDOW) == f"more than {limit} ping frames in {FLOOD_WINDOW:g} s"
    # The next window starts with the first event after the last one ended.
    assert guard.exceeded(ping, 100.0 + FLOOD_WINDOW + 0.001) is None


def test_each_kind_has_its_own_count() -> None:
    guard = FloodGuard()
    for _ in range(FLOOD_LIMITS["ping"]):
        assert guard.exceeded(new(h2.events.PingReceived), 0.0) is None
    for _ in range(FLOOD_LIMITS["settings"]):
        assert guard.exceeded(new(h2.events.RemoteSettingsChanged), 0.0) is None
    assert guard.exceeded(new(h2.events.StreamReset), 0.0) is None


def ping_server(server: Server, count: int) -> None:
    for n in range(count):
        server.client.ping(n.to_bytes(8, "big"))
    server.send()


def test_a_ping_flood_is_cut_off_with_enhance_your_calm() -> None:
    server = Server()
    server.handshake()
    ping_server(server, FLOOD_LIMITS["ping"])
    server.now += FLOOD_WINDOW + 1
    ping_server(server, FLOOD_LIMITS["ping"])  # a new window: as many again are fine
    for n in range(FLOOD_LIMITS["ping"]):
        server.client.ping(n.to_bytes(8, "big"))
    with pytest.raises(PeerMisbehaved, match="floods the connection"):
        server.send()
    [goaway] = of(h2.events.ConnectionTerminated, server.reply())
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_is_cut_off() -> None:
    server = Server()
    server.handshake()
    for n in range(FLOOD_LIMITS["reset"] + 1):
        server.client.send_headers(2 * n + 1, request("/healthz", "GET"), end_stream=True)
        server.client.reset_stream(2 * n + 1)
    with pytest.raises(PeerMisbehaved, match="more than 500 reset frames"):
        server.send()


# -- memory -----------------------------------------------------------------------------------


def test_closed_streams_remembered_are_bounded() -> None:
    server = Server()
    server.handshake()
    for n in range(CLOSED_STREAMS_KEPT + 50):
        server.client.send_headers(2 * n + 1, request("/healthz", "GET"), end_stream=True)
        [stream] = server.send()
        server.session.send_headers(stream, [(b":status", b"200")], end_stream=True)
        server.reply()
    assert server.session.closed_streams_kept == CLOSED_STREAMS_KEPT
    assert server.session.active_streams == 0


def test_status_of_refuses_a_missing_or_malformed_status() -> None:
    assert status_of([(b":status", b"404")]) == 404
    for headers in ([], [(b":status", b"20")], [(b":status", b"abc")]):
        with pytest.raises(StreamReset):
            status_of(headers)
