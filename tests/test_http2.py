"""The trio shell of HTTP/2 (`relay.net.h2connection.Http2Connection`), over in-memory streams.

Both ends are usually `Http2Connection` objects (client and server) joined by
`trio.testing.memory_stream_pair()`.  Where our own client cannot show what
the server puts on the wire (after a GOAWAY, h2 refuses every frame, so the
client dies on receipt), the client is a `RawPeer`: an h2 state machine that
only *encodes*, and a hyperframe parser that reads the server's frames one by
one.

Every test runs under `trio.fail_after`; every timeout, keepalive and drain
test runs on the `autojump_clock` and asserts exact virtual times.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import hpack
import hyperframe.frame
import pytest
import trio
import trio.lowlevel
import trio.testing

from relay.core.h2session import (
    CLOSED_STREAMS_KEPT,
    CONNECTION_WINDOW,
    STREAM_WINDOW,
    BodyTooLarge,
    ConnectionClosed,
    Http2Settings,
    StreamRefused,
    StreamReset,
    status_of,
)
from relay.net.h2connection import H2Stream, Http2Connection

KiB = 1024
MiB = 1024 * KiB
# Real-time bound for tests that do not use the virtual clock: everything
# here takes milliseconds, a hang must still end the test.
STEP = 10.0
# Virtual-time bound for the autojump tests: far above any time they assert.
VIRTUAL_STEP = 1000.0
# No PINGs unless a test is about them: keeps virtual time and bytes exact.
QUIET = Http2Settings(keepalive_interval=None)
# Size of a PING (or PING ACK) frame on the wire: 9-byte header, 8-byte payload.
PING_FRAME = 17

Handler = Callable[[H2Stream], Awaitable[None]]


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that are not all alike, so a lost or reordered chunk shows."""
    return random.Random(seed).randbytes(size)


def request_headers(path: str, method: str = "POST") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", b"hub.test"),
        (b":path", path.encode()),
    ]


def path_of(stream: H2Stream) -> str:
    return dict(stream.headers or [])[b":path"].decode()


async def post(client: Http2Connection, path: str, body: bytes = b"", *, limit: int = 16 * MiB) -> tuple[int, bytes]:
    return await client.request(
        "POST", path, body, authority="hub.test", content_type=b"application/octet-stream", limit=limit
    )


async def echo_length(stream: H2Stream) -> None:
    """The reference handler: answers with the length of the body it read."""
    body = await stream.read_body(16 * MiB)
    await stream.send_response(200, [(b"content-type", b"text/plain")], str(len(body)).encode())


class Tap(trio.abc.Stream):
    """A transparent stream wrapper that counts what is sent through it and
    can turn into a black hole (a peer gone silent: no FIN, no RST), a broken
    pipe, or a slow link (``delay`` seconds per `send_all`).  Like a real
    socket or TLS stream, it refuses two concurrent `send_all`."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = 0
        self.silent = False
        self.broken = False
        self.delay = 0.0
        self.sending = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self.broken:
            raise trio.BrokenResourceError("cable cut")
        self.sending = True
        try:
            self.sent += len(data)
            if self.delay:
                await trio.sleep(self.delay)
            if self.silent:
                await trio.lowlevel.checkpoint()
            else:
                await self.inner.send_all(data)
        finally:
            self.sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Running:
    """One `Http2Connection` whose `run` was started by `start`."""

    conn: Http2Connection
    done: trio.Event = field(default_factory=trio.Event)
    ended_at: float | None = None


async def start(nursery: trio.Nursery, conn: Http2Connection, handler: Handler | None = None) -> Running:
    running = Running(conn)

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await conn.run(handler, task_status=task_status)
        finally:
            running.ended_at = trio.current_time()
            running.done.set()

    await nursery.start(run)
    return running


@dataclass
class Pair:
    client: Http2Connection
    server: Http2Connection
    client_run: Running
    server_run: Running
    client_tap: Tap
    server_tap: Tap


@asynccontextmanager
async def connected(
    handler: Handler,
    *,
    client_settings: Http2Settings = QUIET,
    server_settings: Http2Settings = QUIET,
) -> AsyncIterator[Pair]:
    """A client and a server `Http2Connection` joined in memory, both running."""
    client_end, server_end = trio.testing.memory_stream_pair()
    client_tap, server_tap = Tap(client_end), Tap(server_end)
    client = Http2Connection(client_tap, client=True, settings=client_settings, name="server")
    server = Http2Connection(server_tap, client=False, settings=server_settings, name="client")
    async with trio.open_nursery() as nursery:
        server_run = await start(nursery, server, handler)
        client_run = await start(nursery, client)
        try:
            yield Pair(client, server, client_run, server_run, client_tap, server_tap)
        finally:
            client.abort()
            server.abort()


class RawPeer:
    """The client end of a connection, frame by frame.

    An h2 client state machine encodes what we send (it is never fed the
    server's bytes, so it never learns about a GOAWAY and keeps sending);
    incoming frames are parsed with hyperframe and headers decoded with hpack.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.decoder = hpack.Decoder()
        self.buffer = bytearray()

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def request(self, stream_id: int, path: str) -> None:
        self.h2.send_headers(stream_id, request_headers(path, "GET"), end_stream=True)
        await self.flush()

    async def next_frame(self) -> hyperframe.frame.Frame | None:
        """The next frame from the server, None at end of stream."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    del self.buffer[: 9 + length]
                    if isinstance(frame, hyperframe.frame.HeadersFrame):
                        frame.decoded = self.decoder.decode(frame.data, raw=True)
                    return frame
            data = await self.stream.receive_some()
            if not data:
                return None
            self.buffer += data

    async def frame_of(self, kind: type[hyperframe.frame.Frame]) -> hyperframe.frame.Frame:
        """The next frame of that kind, skipping connection chatter (SETTINGS, WINDOW_UPDATE)."""
        while True:
            frame = await self.next_frame()
            assert frame is not None, f"connection closed while waiting for {kind.__name__}"
            if isinstance(frame, (hyperframe.frame.SettingsFrame, hyperframe.frame.WindowUpdateFrame)):
                continue
            assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame}"
            return frame


# -- request and response -----------------------------------------------------------


async def test_request_response() -> None:
    with trio.fail_after(STEP):
        async with connected(echo_length) as pair:
            assert await post(pair.client, "/echo", b"hello") == (200, b"5")
            assert await post(pair.client, "/echo") == (200, b"0")
            assert pair.client.active_streams == 0
        assert pair.client_run.done.is_set() and pair.server_run.done.is_set()


async def test_five_mib_each_way_arrive_intact() -> None:
    """Far beyond the 65,535-byte initial windows and 16 KiB default frames:
    flow control, window updates and frame sizes all take part."""
    request_body = payload(5 * MiB, seed=1)
    seen: list[bytes] = []

    async def mirror(stream: H2Stream) -> None:
        body = await stream.read_body(6 * MiB)
        seen.append(hashlib.sha256(body).digest())
        await stream.send_response(200, [], body[::-1])

    with trio.fail_after(STEP):
        async with connected(mirror) as pair:
            status, response = await post(pair.client, "/mirror", request_body, limit=6 * MiB)
    assert status == 200
    assert seen == [hashlib.sha256(request_body).digest()]
    assert len(response) == 5 * MiB and response == request_body[::-1]


async def test_hundred_concurrent_uploads_share_the_connection_window() -> None:
    """100 uploads of 256 KiB at once.  While no handler reads, exactly
    CONNECTION_WINDOW bytes get through (64 whole uploads: the connection
    window, not the 64 KiB default, is the limit); once they read, all finish."""
    size, count = 256 * KiB, 100
    release = trio.Event()
    uploaded = 0
    answers: dict[int, bytes] = {}

    async def digest(stream: H2Stream) -> None:
        if path_of(stream) != "/warm-up":
            await release.wait()
        body = await stream.read_body(MiB)
        await stream.send_response(200, [], hashlib.sha256(body).digest())

    async def upload(client: Http2Connection, i: int) -> None:
        nonlocal uploaded
        stream = client.open_stream(request_headers(f"/upload/{i}"))
        await stream.send_data(payload(size, seed=i), end_stream=True)
        uploaded += 1
        assert status_of(await stream.receive_headers()) == 200
        answers[i] = await stream.read_body(64)

    with trio.fail_after(STEP):
        async with connected(digest) as pair:
            # One exchange first, so both SETTINGS and the connection
            # WINDOW_UPDATE are in place (and no DATA counted yet).
            assert await post(pair.client, "/warm-up") == (200, hashlib.sha256(b"").digest())
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(upload, pair.client, i)
                await trio.testing.wait_all_tasks_blocked()
                assert uploaded == CONNECTION_WINDOW // size == 64
                assert pair.server.active_streams == count
                release.set()
    assert uploaded == count
    assert answers == {i: hashlib.sha256(payload(size, seed=i)).digest() for i in range(count)}


async def test_a_long_lived_connection_forgets_old_closed_streams() -> None:
    """h2 remembers how each of the last 2**16 closed streams ended, at over
    100 bytes each: on the uplink, the hub's connections and a pooled local
    API connection, the relays grew by megabytes over minutes of steady
    traffic.  Ours remember CLOSED_STREAMS_KEPT, on both sides."""
    count, workers = CLOSED_STREAMS_KEPT + 200, 20

    async def worker(client: Http2Connection, first: int) -> None:
        for _ in range(first, count, workers):
            assert await post(client, "/echo", b"x") == (200, b"1")

    with trio.fail_after(STEP):
        async with connected(echo_length) as pair:
            async with trio.open_nursery() as nursery:
                for first in range(workers):
                    nursery.start_soon(worker, pair.client, first)
            for conn in (pair.client, pair.server):
                assert conn.session.closed_streams_kept == CLOSED_STREAMS_KEPT


async def test_unread_body_parks_the_sender_until_the_handler_reads(autojump_clock: trio.abc.Clock) -> None:
    """Back-pressure: the handler reads nothing for 10 s; the sender hands
    over one stream window (STREAM_WINDOW) and parks, then resumes at the
    very moment the handler starts reading."""
    body = payload(3 * MiB, seed=2)
    received: list[bytes] = []

    async def slow_reader(stream: H2Stream) -> None:
        if path_of(stream) == "/slow":
            await trio.sleep(10)
        received.append(await stream.read_body(4 * MiB))
        await stream.send_response(200, [], b"")

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with connected(slow_reader) as pair:
            await post(pair.client, "/warm-up")
            before = pair.client_tap.sent
            sent_at: list[float] = []

            async def sender() -> None:
                stream = pair.client.open_stream(request_headers("/slow"))
                await stream.send_data(body, end_stream=True)
                sent_at.append(trio.current_time() - t0)
                assert status_of(await stream.receive_headers()) == 200

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.sleep(5)
                assert sent_at == []
                on_wire = pair.client_tap.sent - before
                # One stream window of DATA, plus HEADERS and 9 bytes per frame.
                assert STREAM_WINDOW < on_wire < STREAM_WINDOW + 1024
            assert sent_at == [10.0]
    assert received[-1] == body


# -- keepalive ----------------------------------------------------------------------

KEEPALIVE = Http2Settings(keepalive_interval=5, keepalive_timeout=2)


async def test_keepalive_unanswered_closes_at_interval_plus_timeout(autojump_clock: trio.abc.Clock) -> None:
    """The peer never speaks (half-open TCP): first PING at 5 s, no answer
    by 7 s, the connection is declared dead and its streams fail."""
    client_end, _server_end = trio.testing.memory_stream_pair()
    client = Http2Connection(client_end, client=True, settings=KEEPALIVE, name="server")
    failures: list[Exception] = []

    async def waiting(stream: H2Stream) -> None:
        try:
            await stream.receive_headers()
        except ConnectionClosed as exc:
            failures.append(exc)

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            running = await start(nursery, client)
            nursery.start_soon(waiting, client.open_stream(request_headers("/never"), end_stream=True))
            await running.done.wait()
            assert running.ended_at - t0 == 5 + 2
    assert [type(exc) for exc in failures] == [ConnectionClosed]
    assert not client.is_open
    with pytest.raises(ConnectionClosed):
        client.open_stream(request_headers("/later"))


async def test_keepalive_detects_a_peer_that_goes_silent(autojump_clock: trio.abc.Clock) -> None:
    """Healthy until 12 s, then every byte the server writes is lost: the
    PINGs at 5 and 10 s were answered, the one at 15 s is not: dead at 17 s."""
    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with connected(echo_length, client_settings=KEEPALIVE) as pair:
            await trio.sleep(12)
            assert pair.client.is_open
            pair.server_tap.silent = True
            await pair.client_run.done.wait()
            assert pair.client_run.ended_at - t0 == 15 + 2
            # The server sees the client close its end.
            await pair.server_run.done.wait()
            assert pair.server_run.ended_at - t0 == 17


async def test_keepalive_keeps_a_healthy_connection_up(autojump_clock: trio.abc.Clock) -> None:
    """Both ends ping every 5 s for 102 s: 20 PINGs and 20 PING ACKs each
    way, nothing else, and the connection still serves requests."""
    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with connected(echo_length, client_settings=KEEPALIVE, server_settings=KEEPALIVE) as pair:
            await trio.sleep(1)  # the handshake is over long before
            client_sent, server_sent = pair.client_tap.sent, pair.server_tap.sent
            await trio.sleep(101)
            assert trio.current_time() - t0 == 102
            assert pair.client_tap.sent - client_sent == 40 * PING_FRAME
            assert pair.server_tap.sent - server_sent == 40 * PING_FRAME
            assert pair.client.is_open and pair.server.is_open
            assert not pair.client_run.done.is_set() and not pair.server_run.done.is_set()
            assert await post(pair.client, "/echo", b"still here") == (200, b"10")


# -- GOAWAY and graceful close --------------------------------------------------------


async def test_goaway_ends_our_client_at_once() -> None:
    """What the module documents for a GOAWAY *received*: h2 closes the
    client connection on receipt, so the stream the server was processing
    fails with ConnectionClosed (outcome unknown) and the one it never saw
    (sent after the GOAWAY left) with StreamRefused (safe to retry)."""
    in_handler = trio.Event()
    outcome: list[str] = []

    async def stuck(stream: H2Stream) -> None:
        in_handler.set()
        try:
            await trio.sleep_forever()
        finally:
            outcome.append(path_of(stream))

    with trio.fail_after(STEP):
        async with connected(stuck) as pair:
            first = pair.client.open_stream(request_headers("/first"), end_stream=True)
            await in_handler.wait()
            pair.server.send_goaway()
            assert not pair.server.is_open
            # Opened before the GOAWAY arrives: above its last_stream_id.
            second = pair.client.open_stream(request_headers("/second"), end_stream=True)
            with pytest.raises(ConnectionClosed) as first_error:
                await first.receive_headers()
            assert not isinstance(first_error.value, StreamRefused)
            with pytest.raises(StreamRefused):
                await second.receive_headers()
            await pair.client_run.done.wait()
            with pytest.raises(ConnectionClosed):
                pair.client.open_stream(request_headers("/third"))
            # The client hung up: the server's connection ends too.
            await pair.server_run.done.wait()
    assert outcome == ["/first"]


@asynccontextmanager
async def raw_client(
    handler: Handler, settings: Http2Settings = QUIET, *, send_delay: float = 0.0
) -> AsyncIterator[tuple[RawPeer, Running, Tap]]:
    """A running server `Http2Connection` and a `RawPeer` as its client,
    preface sent; the Tap is the server's side of the transport."""
    client_end, server_end = trio.testing.memory_stream_pair()
    tap = Tap(server_end)
    tap.delay = send_delay
    server = Http2Connection(tap, client=False, settings=settings, name="client")
    peer = RawPeer(client_end)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, server, handler)
        await peer.flush()
        try:
            yield peer, running, tap
        finally:
            server.abort()


async def test_graceful_close_answers_in_flight_and_refuses_new_streams(autojump_clock: trio.abc.Clock) -> None:
    """Seen on the wire: GOAWAY(last_stream_id=1, NO_ERROR) first; a stream
    opened afterwards gets RST_STREAM(REFUSED_STREAM); stream 1 still gets its
    whole response; the close completes the moment it is sent (3 s), not at
    the drain timeout."""
    in_handler = trio.Event()

    async def slow(stream: H2Stream) -> None:
        in_handler.set()
        await trio.sleep(3)
        await stream.send_response(200, [], b"done")

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with raw_client(slow, Http2Settings(keepalive_interval=None, drain_timeout=10)) as (peer, running, _):
            await peer.request(1, "/slow")
            await in_handler.wait()
            closed_at: list[float] = []

            async def close() -> None:
                await running.conn.aclose_gracefully()
                closed_at.append(trio.current_time() - t0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close)
                goaway = await peer.frame_of(hyperframe.frame.GoAwayFrame)
                assert (goaway.last_stream_id, goaway.error_code) == (1, h2.errors.ErrorCodes.NO_ERROR)
                await peer.request(3, "/too-late")
                reset = await peer.frame_of(hyperframe.frame.RstStreamFrame)
                assert (reset.stream_id, reset.error_code) == (3, h2.errors.ErrorCodes.REFUSED_STREAM)
                headers = await peer.frame_of(hyperframe.frame.HeadersFrame)
                assert headers.stream_id == 1 and (b":status", b"200") in headers.decoded
                data = await peer.frame_of(hyperframe.frame.DataFrame)
                assert (data.stream_id, data.data, "END_STREAM" in data.flags) == (1, b"done", True)
                assert trio.current_time() - t0 == 3
                assert await peer.next_frame() is None  # then the server hangs up
            assert closed_at == [3]
            await running.done.wait()
            assert running.ended_at - t0 == 3


async def test_graceful_close_gives_up_after_the_drain_timeout(autojump_clock: trio.abc.Clock) -> None:
    cancelled = trio.Event()
    in_handler = trio.Event()

    async def forever(stream: H2Stream) -> None:
        in_handler.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with raw_client(forever, Http2Settings(keepalive_interval=None, drain_timeout=4)) as (peer, running, _):
            await peer.request(1, "/forever")
            await in_handler.wait()
            await running.conn.aclose_gracefully()
            assert trio.current_time() - t0 == 4
            await running.done.wait()
            assert running.ended_at - t0 == 4
            assert cancelled.is_set()


# -- failures confined to one stream ----------------------------------------------------


async def test_reset_by_the_client_reaches_the_handler() -> None:
    got_first = trio.Event()
    seen: list[object] = []

    async def reader(stream: H2Stream) -> None:
        if path_of(stream) != "/upload":
            return await echo_length(stream)
        seen.append(await stream.receive_some())
        got_first.set()
        try:
            await stream.receive_some()
        except StreamReset as exc:
            seen.append(type(exc))

    with trio.fail_after(STEP):
        async with connected(reader) as pair:
            stream = pair.client.open_stream(request_headers("/upload"))
            await stream.send_data(b"first")
            await got_first.wait()
            stream.reset()
            with pytest.raises(StreamReset):
                await stream.send_data(b"more")
            while len(seen) < 2:
                await trio.lowlevel.checkpoint()
            assert seen == [b"first", StreamReset]
            assert await post(pair.client, "/echo", b"abc") == (200, b"3")


async def test_reset_by_the_server_reaches_the_client() -> None:
    async def refuser(stream: H2Stream) -> None:
        if path_of(stream) == "/refused":
            stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
        else:
            await echo_length(stream)

    with trio.fail_after(STEP):
        async with connected(refuser) as pair:
            stream = pair.client.open_stream(request_headers("/refused"))
            with pytest.raises(StreamReset):
                await stream.receive_headers()
            with pytest.raises(StreamReset):
                await stream.receive_some()
            # Sending on a stream the peer reset raises our error, not h2's.
            with pytest.raises(StreamReset):
                await stream.send_data(b"late", end_stream=True)
            with pytest.raises(StreamReset):
                await post(pair.client, "/refused", b"x")
            assert await post(pair.client, "/echo", b"abcd") == (200, b"4")
            assert pair.client.active_streams == pair.server.active_streams == 0


async def test_body_too_large_resets_only_that_stream() -> None:
    refused: list[int] = []

    async def limited(stream: H2Stream) -> None:
        try:
            body = await stream.read_body(1000)
        except BodyTooLarge:
            refused.append(stream.id)
            raise
        await stream.send_response(200, [], str(len(body)).encode())

    with trio.fail_after(STEP):
        async with connected(limited) as pair:
            assert await post(pair.client, "/small", payload(1000)) == (200, b"1000")
            with pytest.raises(StreamReset):
                await post(pair.client, "/big", payload(256 * KiB))
            assert await post(pair.client, "/small", payload(10)) == (200, b"10")
    assert refused == [3]


async def test_handler_exception_resets_only_its_stream(caplog: pytest.LogCaptureFixture) -> None:
    boom_done = trio.Event()

    async def handler(stream: H2Stream) -> None:
        if path_of(stream) == "/boom":
            await stream.read_body(MiB)
            boom_done.set()
            raise RuntimeError("bug in the handler")
        await boom_done.wait()  # in flight while the other stream blows up
        await echo_length(stream)

    with trio.fail_after(STEP):
        async with connected(handler) as pair:
            results: dict[str, object] = {}

            async def call(path: str) -> None:
                try:
                    results[path] = await post(pair.client, path, b"payload")
                except StreamReset as exc:
                    results[path] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "/echo")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(call, "/boom")
            assert isinstance(results["/boom"], StreamReset)
            assert results["/echo"] == (200, b"7")
            assert await post(pair.client, "/echo", b"again") == (200, b"5")
            assert pair.server.is_open
    assert any(r.levelno == logging.ERROR and "request handler failed" in r.getMessage() for r in caplog.records)


async def test_answer_to_a_request_the_client_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    """The client gives up (RST_STREAM) while the handler works: the handler's
    answer raises StreamReset, which is no handler failure worth a traceback."""
    got_body, client_gone = trio.Event(), trio.Event()
    outcome: list[type[Exception]] = []

    async def handler(stream: H2Stream) -> None:
        if path_of(stream) == "/echo":
            return await echo_length(stream)
        await stream.read_body(MiB)
        got_body.set()
        await client_gone.wait()
        try:
            await stream.send_response(200, [], b"too late")
        except Exception as exc:
            outcome.append(type(exc))
            raise

    with trio.fail_after(STEP):
        async with connected(handler) as pair:
            stream = pair.client.open_stream(request_headers("/slow"))
            await stream.send_data(b"body", end_stream=True)
            await got_body.wait()
            stream.reset()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.server.active_streams == 0
            client_gone.set()
            assert await post(pair.client, "/echo", b"next") == (200, b"4")
    assert outcome == [StreamReset]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def _read_too_little(stream: H2Stream) -> None:
    await stream.read_body(1000)  # BodyTooLarge: read_body resets the stream


async def _raise(stream: H2Stream) -> None:
    raise RuntimeError("handler bug")


async def _answer_without_reading(stream: H2Stream) -> None:
    await stream.send_response(400, [], b"bad request")


async def _return_without_answer(stream: H2Stream) -> None:
    return


ABANDONED_BODY = [
    # (handler, request body size, what the client gets)
    pytest.param(_read_too_little, STREAM_WINDOW, StreamReset, id="read_body-over-limit"),
    pytest.param(_raise, STREAM_WINDOW, StreamReset, id="handler-raises"),
    pytest.param(_answer_without_reading, STREAM_WINDOW, (400, b"bad request"), id="answer-ignoring-body"),
    # The client is still sending when the answer and RST_STREAM(NO_ERROR)
    # come: it keeps the answer (RFC 9113 §8.1).
    pytest.param(_answer_without_reading, 3 * MiB, (400, b"bad request"), id="answer-before-body-complete"),
    pytest.param(_return_without_answer, STREAM_WINDOW, StreamReset, id="no-answer"),
    pytest.param(_return_without_answer, 3 * MiB, StreamReset, id="no-answer-before-body-complete"),
]


@pytest.mark.parametrize(("abandon", "size", "expected"), ABANDONED_BODY)
async def test_abandoned_bodies_are_credited_back(
    autojump_clock: trio.abc.Clock, abandon: Handler, size: int, expected: object
) -> None:
    """A handler that leaves (part of) a request body unread must not eat the
    connection window: 24 such requests with a full stream window each are
    more than CONNECTION_WINDOW, and a 5 MiB upload must still go through
    after.  Nor may it leave the client waiting for an answer."""
    requests = CONNECTION_WINDOW // STREAM_WINDOW + 8
    body = payload(size, seed=3)

    async def handler(stream: H2Stream) -> None:
        if path_of(stream) == "/echo":
            await echo_length(stream)
            return
        await trio.sleep(1)  # a whole stream window is buffered by then
        await abandon(stream)

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with connected(handler) as pair:
            for _ in range(requests):
                if isinstance(expected, tuple):
                    assert await post(pair.client, "/abandon", body) == expected
                else:
                    with pytest.raises(expected):
                        await post(pair.client, "/abandon", body)
            assert trio.current_time() - t0 == requests
            assert await post(pair.client, "/echo", payload(5 * MiB)) == (200, str(5 * MiB).encode())
            assert pair.client.active_streams == pair.server.active_streams == 0


# -- cancellation and broken transports --------------------------------------------------


async def test_cancelled_send_data_leaves_the_connection_usable(autojump_clock: trio.abc.Clock) -> None:
    """A sender cancelled while parked on flow control (and a whole request
    cancelled by its deadline) leave nothing half-written: the next requests,
    large ones included, go through."""

    async def handler(stream: H2Stream) -> None:
        if path_of(stream) == "/echo":
            await echo_length(stream)
            return
        await trio.sleep_forever()  # never reads: the sender parks

    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with connected(handler) as pair:
            stream = pair.client.open_stream(request_headers("/parked"))
            with trio.move_on_after(1) as scope:
                await stream.send_data(payload(3 * MiB), end_stream=True)
            assert scope.cancelled_caught and trio.current_time() - t0 == 1
            assert await post(pair.client, "/echo", payload(2 * MiB)) == (200, str(2 * MiB).encode())
            stream.reset()

            with trio.move_on_after(1) as scope:
                await post(pair.client, "/deadline", payload(3 * MiB))
            assert scope.cancelled_caught and trio.current_time() - t0 == 2
            assert await post(pair.client, "/echo", payload(3 * MiB)) == (200, str(3 * MiB).encode())
            assert pair.client.is_open and pair.server.is_open
            # Both abandoned streams were reset, not left open on the server.
            assert pair.client.active_streams == pair.server.active_streams == 0


async def test_broken_transport_kills_the_connection() -> None:
    entered = trio.Event()

    async def stuck(stream: H2Stream) -> None:
        entered.set()
        await trio.sleep_forever()

    with trio.fail_after(STEP):
        async with connected(stuck) as pair:
            stream = pair.client.open_stream(request_headers("/stuck"), end_stream=True)
            await entered.wait()
            pair.client_tap.broken = True
            with pytest.raises(ConnectionClosed):
                await post(pair.client, "/next", b"x")
            with pytest.raises(ConnectionClosed):
                await stream.receive_headers()
            await pair.client_run.done.wait()
            assert not pair.client.is_open


# -- garbage --------------------------------------------------------------------------

HTTP1_REQUEST = b"GET / HTTP/1.1\r\nHost: hub.test\r\n\r\n"
HTTP1_RESPONSE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
# A well-formed frame header for an impossible frame: DATA on stream 0.
JUNK_FRAME = b"\x00\x00\x01" + b"\x00" + b"\x00" + b"\x00\x00\x00\x00" + b"x"


async def _goaways_until_eof(peer: RawPeer) -> list[int]:
    codes = []
    while (frame := await peer.next_frame()) is not None:
        if isinstance(frame, hyperframe.frame.GoAwayFrame):
            codes.append(frame.error_code)
    return codes


GARBAGE_TO_SERVER = [
    # (what the "client" sends, GOAWAY codes it gets before the server hangs up)
    # h2 omits the GOAWAY for a bad preface, as RFC 9113 §3.4 allows.
    pytest.param(HTTP1_REQUEST, [], id="http1-request"),
    pytest.param(None, [h2.errors.ErrorCodes.PROTOCOL_ERROR], id="junk-frame-after-preface"),
]


@pytest.mark.parametrize("early", [True, False], ids=["before-run", "after-run"])
@pytest.mark.parametrize(("garbage", "goaways"), GARBAGE_TO_SERVER)
async def test_garbage_to_a_server_ends_its_run(garbage: bytes | None, goaways: list[int], early: bool) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    server = Http2Connection(server_end, client=False, settings=QUIET, name="client")
    peer = RawPeer(client_end)
    if garbage is None:
        garbage = peer.h2.data_to_send() + JUNK_FRAME
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            if early:  # read while the writer is still sending the server's SETTINGS
                await client_end.send_all(garbage)
            running = await start(nursery, server, echo_length)
            if not early:
                await client_end.send_all(garbage)
            assert await _goaways_until_eof(peer) == goaways
            await running.done.wait()
    assert not server.is_open


async def test_protocol_error_while_the_writer_is_busy(autojump_clock: trio.abc.Clock) -> None:
    """The peer's junk arrives while the writer is in the middle of a slow
    send_all: the GOAWAY waits its turn behind it (a second writer would get
    BusyResourceError), then the connection closes."""
    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        # 0.25 s per send_all: SETTINGS out at 0.25 s, SETTINGS ACK at 0.5 s.
        async with raw_client(echo_length, send_delay=0.25) as (peer, running, tap):
            while not isinstance(frame := await peer.next_frame(), hyperframe.frame.SettingsFrame) or (
                "ACK" not in frame.flags
            ):
                pass
            assert trio.current_time() - t0 == 0.5
            peer.h2.ping(b"12345678")
            await peer.flush()  # the PING ACK is written from 0.5 s to 0.75 s
            await trio.sleep(0.125)
            assert tap.sending
            await peer.stream.send_all(JUNK_FRAME)
            frames = []
            while (frame := await peer.next_frame()) is not None:
                frames.append(frame)
            ping_ack, goaway = frames
            assert isinstance(ping_ack, hyperframe.frame.PingFrame) and "ACK" in ping_ack.flags
            assert isinstance(goaway, hyperframe.frame.GoAwayFrame)
            assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            await running.done.wait()
            assert running.ended_at - t0 == 1.0  # GOAWAY written from 0.75 s to 1 s


GARBAGE_TO_CLIENT = [
    # (what the "server" sends, when the client's run returns)
    pytest.param(JUNK_FRAME, 0, id="junk-frame"),
    # "HTT" reads as a 4.7 MB frame length: h2 waits for the whole frame
    # before it checks the size, so only the keepalive PING notices.
    pytest.param(HTTP1_RESPONSE, 5 + 2, id="http1-response"),
]


@pytest.mark.parametrize(("garbage", "ends_at"), GARBAGE_TO_CLIENT)
async def test_garbage_to_a_client_ends_its_run(autojump_clock: trio.abc.Clock, garbage: bytes, ends_at: float) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    client = Http2Connection(client_end, client=True, settings=KEEPALIVE, name="server")
    with trio.fail_after(VIRTUAL_STEP):
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            running = await start(nursery, client)
            stream = client.open_stream(request_headers("/x"), end_stream=True)
            await server_end.send_all(garbage)
            with pytest.raises(ConnectionClosed):
                await stream.receive_headers()
            await running.done.wait()
            assert running.ended_at - t0 == ends_at
    assert not client.is_open
