"""The load generator: HTTP/2 (h2) and HTTP/1.1 keep-alive (h11) clients on trio.

Theory of operation
-------------------
The generator is written in Python with the same libraries as the relay,
on purpose: it runs on the same two cores as the servers it drives, and a
generator that is much cheaper (h2load, written in C) or much dearer than
the server would move every ratio.  The same code drives the relay's local
API and the bare "Python ceiling" server, so whatever it costs is paid on
both sides of a ratio.  h2load, where installed, gives a second opinion.

`H2Client` is the one owner of its `h2.connection.H2Connection` (STYLE.md
rule 2): requests change h2's state synchronously and wake the single
writer task; a single reader task feeds h2 and completes the waiting
requests.  A failed write or read kills the connection and every request
on it; connections are never reused after that.  `H1Client` is one h11
keep-alive connection, one request at a time.

Two ways to offer load:

* *closed loop* (`closed_loop`): N workers, each sending its next request
  as soon as the previous one is answered: N concurrent streams.  Measures
  capacity (accepted per second).
* *open loop* (`open_loop`): requests start on a fixed schedule whatever
  the answers do, so a slow server cannot slow the offered load down and
  hide its own latency (no "coordinated omission").

Every loop here is bounded in time by a visible deadline.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio

# Windows far above h2's 64 KiB default: with the default, a hundred 1 KiB
# uploads in flight stall on connection flow control (see the notes).
CLIENT_WINDOW = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
# Most streams one connection may carry: the relay and the bare server both
# announce 100 (SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_STREAMS_PER_CONNECTION = 100
# A request that takes longer than this is a failure, not a latency sample.
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


class RequestFailed(Exception):
    """A request got no complete answer: the connection died or it timed out."""


@dataclass(frozen=True)
class Target:
    """Where the load goes: a loopback address, with TLS (and client cert) or not."""

    host: str
    port: int
    authority: str
    tls: ssl.SSLContext | None = None
    server_name: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Target:
        """A cleartext target from ``http://127.0.0.1:PORT``."""
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        return cls(host, int(port), f"{host}:{port}")


def client_tls(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 client context presenting a certificate, as the relay's uplink does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def _open(target: Target) -> trio.abc.Stream:
    with trio.fail_after(CONNECT_TIMEOUT):
        stream: trio.abc.Stream = await trio.open_tcp_stream(target.host, target.port)
        if target.tls is not None:
            stream = trio.SSLStream(stream, target.tls, server_hostname=target.server_name or target.host)
            await stream.do_handshake()
    return stream


# -- HTTP/2 -------------------------------------------------------------------------


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    error: str | None = None


class H2Client:
    """One HTTP/2 connection (prior knowledge on cleartext, ALPN on TLS).

    Resource handling: `open` starts the reader and writer in the caller's
    nursery (so they die with it) and `aclose` ends them and the socket.
    Error handling: when the connection dies, every pending and later
    request raises `RequestFailed`; a request cancelled by its caller is
    just forgotten (the runs close their connections right after).
    """

    def __init__(self, stream: trio.abc.Stream, target: Target) -> None:
        self._stream = stream
        self._scheme = b"https" if target.tls is not None else b"http"
        self._authority = target.authority.encode()
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._pending: dict[int, _Pending] = {}
        self._wake_writer = trio.Event()
        self._window_opened = trio.Event()
        self._dead: str | None = None
        self._scope = trio.CancelScope()
        self.slots = trio.Semaphore(MAX_STREAMS_PER_CONNECTION)

    @classmethod
    async def open(cls, nursery: trio.Nursery, target: Target) -> H2Client:
        client = cls(await _open(target), target)
        client._h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_WINDOW,
                                         h2.settings.SettingCodes.ENABLE_PUSH: 0})
        client._h2.initiate_connection()
        client._h2.increment_flow_control_window(CLIENT_WINDOW - 65535)
        nursery.start_soon(client._run)
        return client

    async def aclose(self) -> None:
        self._die("closed by the generator")
        self._scope.cancel()
        await trio.aclose_forcefully(self._stream)

    async def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> tuple[int, bytes]:
        """One exchange; raises `RequestFailed` if the connection dies first."""
        if self._dead is not None:
            raise RequestFailed(self._dead)
        sid = self._h2.get_next_available_stream_id()
        pending = self._pending[sid] = _Pending()
        try:
            self._h2.send_headers(sid, [(b":method", method), (b":scheme", self._scheme),
                                        (b":authority", self._authority), (b":path", path), *headers],
                                  end_stream=not body)
            view = memoryview(body)
            while view:
                window = min(self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size)
                if window <= 0:
                    self._kick()
                    await self._window_opened.wait()
                    if self._dead is not None:
                        raise RequestFailed(self._dead)
                    continue
                chunk, view = view[:window], view[window:]
                self._h2.send_data(sid, bytes(chunk), end_stream=not view)
            self._kick()
        except h2.exceptions.H2Error as exc:
            self._pending.pop(sid, None)
            raise RequestFailed(f"h2 refused the request: {exc!r}") from None
        await pending.done.wait()
        if pending.error is not None:
            raise RequestFailed(pending.error)
        return pending.status, bytes(pending.body)

    def _kick(self) -> None:
        self._wake_writer.set()

    def _die(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        for pending in self._pending.values():
            pending.error = pending.error or reason
            pending.done.set()
        self._pending.clear()
        self._window_opened.set()
        self._wake_writer.set()

    async def _run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader()
                nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        while self._dead is None:
            data = self._h2.data_to_send()
            if not data:
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
                continue
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(f"write failed: {exc!r}")

    async def _reader(self) -> None:
        while self._dead is None:
            try:
                data = await self._stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(f"read failed: {exc!r}")
                return
            if not data:
                self._die("the server closed the connection")
                return
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._die(f"protocol error: {exc!r}")
                return
            for event in events:
                self._dispatch(event)
            self._kick()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            if (pending := self._pending.get(event.stream_id)) is not None:
                for name, value in event.headers:
                    if name == b":status":
                        pending.status = int(value)
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if (pending := self._pending.get(event.stream_id)) is not None:
                pending.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            if (pending := self._pending.pop(event.stream_id, None)) is not None:
                pending.done.set()
        elif isinstance(event, h2.events.StreamReset):
            if (pending := self._pending.pop(event.stream_id, None)) is not None:
                pending.error = f"stream reset by the server (code {event.error_code})"
                pending.done.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window_opened.set()  # wakes every parked sender; they re-check their window
            self._window_opened = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._die(f"GOAWAY from the server (code {event.error_code})")


# -- HTTP/1.1 -----------------------------------------------------------------------


class H1Client:
    """One HTTP/1.1 keep-alive connection: one request at a time."""

    def __init__(self, stream: trio.abc.Stream, target: Target) -> None:
        self._stream = stream
        self._host = target.authority.encode()
        self._conn = h11.Connection(h11.CLIENT)
        self.slots = trio.Semaphore(1)

    @classmethod
    async def connect(cls, target: Target) -> H1Client:
        return cls(await _open(target), target)

    @classmethod
    async def open(cls, nursery: trio.Nursery, target: Target) -> H1Client:
        """The `Opener` signature; an h11 connection needs no background task."""
        return await cls.connect(target)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> tuple[int, bytes]:
        try:
            if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
                self._conn.start_next_cycle()
            out = self._conn.send(h11.Request(method=method, target=path, headers=[
                (b"host", self._host), (b"content-length", str(len(body)).encode()), *headers]))
            if body:
                out += self._conn.send(h11.Data(data=body))
            out += self._conn.send(h11.EndOfMessage())
            await self._stream.send_all(out)
            status, answer = 0, bytearray()
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._stream.receive_some(READ_CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, bytes(answer)
                elif isinstance(event, h11.ConnectionClosed):
                    raise RequestFailed("the server closed the connection")
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise RequestFailed(f"HTTP/1.1: {exc!r}") from None


class Client(Protocol):
    slots: trio.Semaphore

    async def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


# -- what to send -------------------------------------------------------------------


def message_body(tag: str, seq: int, sender: str, recipient: str, *, size: int = 1024,
                 priority: str = "normal") -> bytes:
    """A POST /v1/messages document whose message body is ``size`` bytes.

    The body starts with ``tag seq`` so the reader at the destination can
    match each event with the moment it was sent."""
    head = f"{tag} {seq} "
    document = {"from": sender, "to": [recipient], "body": head + "x" * max(0, size - len(head))}
    if priority != "normal":
        document["priority"] = priority
    return json.dumps(document, separators=(",", ":")).encode()


def parse_marker(body: str) -> tuple[str, int] | None:
    """The (tag, seq) a `message_body` starts with, or None for other messages."""
    tag, _, rest = body.partition(" ")
    seq, _, _ = rest.partition(" ")
    return (tag, int(seq)) if seq.isdigit() else None


@dataclass(frozen=True)
class Post:
    """How to submit message number ``seq``: the path, headers and a body maker."""

    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: Callable[[int], bytes]
    accepted: int = 202


def api_post(token: str, body: Callable[[int], bytes]) -> Post:
    return Post(b"/v1/messages", [(b"content-type", b"application/json"),
                                  (b"authorization", f"Bearer {token}".encode())], body)


# -- offering load ------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one load run did: answers, failures and timings (seconds)."""

    accepted: int = 0
    refused: int = 0
    failed: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    sent_at: dict[int, float] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0


Opener = Callable[[trio.Nursery], Awaitable[Client]]


def opener(target: Target, http: str) -> Opener:
    """A function opening one client connection of kind ``http`` ("h2" or "h1")."""
    kind = {"h2": H2Client, "h1": H1Client}[http]
    return lambda nursery: kind.open(nursery, target)


def connections_for(streams: int, http: str) -> int:
    """How many connections carry ``streams`` concurrent requests.

    HTTP/1.1: one per stream.  HTTP/2: one up to 10 streams, then one per
    25 streams, "many streams over a few connections" as a vendor's
    connection pool would do."""
    if http == "h1":
        return streams
    return 1 if streams <= 10 else math.ceil(streams / 25)


async def closed_loop(open_client: Opener, post: Post, *, streams: int, connections: int,
                      duration: float | None = None, total: int | None = None, warmup: float = 0.0,
                      first_seq: int = 0, timeout: float = 600.0) -> LoadResult:
    """``streams`` workers sending back to back, for ``duration`` s (after
    ``warmup`` s not counted) or until ``total`` requests have been answered.

    Requests still in flight at the end of ``duration`` are abandoned with
    their connections and not counted.  ``timeout`` bounds a ``total`` run.
    """
    result = LoadResult()
    counter = iter(range(first_seq, first_seq + total) if total is not None else _forever(first_seq))
    async with trio.open_nursery() as nursery:
        clients = [await open_client(nursery) for _ in range(connections)]
        start = time.perf_counter()
        measure_from = start + warmup
        limit = measure_from + duration if duration is not None else start + timeout

        async def worker(client: Client) -> None:
            for seq in counter:
                began = time.perf_counter()
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        status, _ = await client.request(b"POST", post.path, post.headers, post.body(seq))
                except (RequestFailed, trio.TooSlowError):
                    result.failed += 1
                    continue
                ended = time.perf_counter()
                if ended < measure_from:
                    continue
                if status == post.accepted:
                    result.accepted += 1
                    result.latencies.append(ended - began)
                else:
                    result.refused += 1
                    result.statuses[status] = result.statuses.get(status, 0) + 1

        with trio.move_on_at(trio.current_time() + (limit - time.perf_counter())):
            async with trio.open_nursery() as workers:
                for index in range(streams):
                    workers.start_soon(worker, clients[index % len(clients)])
        result.elapsed = min(time.perf_counter(), limit) - measure_from
        for client in clients:
            await client.aclose()
    return result


def _forever(start: int):
    seq = start
    while True:
        yield seq
        seq += 1


async def open_loop(open_client: Opener, post: Post, *, rate: float, duration: float, connections: int = 2,
                    first_seq: int = 0, max_in_flight: int = 2000) -> LoadResult:
    """Start one request every 1/``rate`` s for ``duration`` s, whatever the answers do.

    ``sent_at[seq]`` keeps each request's start (``time.perf_counter``) for
    a reader that timestamps its arrival elsewhere.  A request that finds
    ``max_in_flight`` others still pending counts as failed rather than
    queueing without bound."""
    result = LoadResult()
    in_flight = trio.Semaphore(max_in_flight)
    async with trio.open_nursery() as nursery:
        clients = [await open_client(nursery) for _ in range(connections)]

        async def one(client: Client, seq: int) -> None:
            began = time.perf_counter()
            result.sent_at[seq] = began
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    async with client.slots:
                        status, _ = await client.request(b"POST", post.path, post.headers, post.body(seq))
            except (RequestFailed, trio.TooSlowError):
                result.failed += 1
                return
            finally:
                in_flight.release()
            if status == post.accepted:
                result.accepted += 1
                result.latencies.append(time.perf_counter() - began)
            else:
                result.refused += 1

        start = time.perf_counter()
        count = int(rate * duration)
        async with trio.open_nursery() as requests:
            for index in range(count):
                await trio.sleep(max(0.0, start + index / rate - time.perf_counter()))
                try:
                    in_flight.acquire_nowait()
                except trio.WouldBlock:
                    result.failed += 1
                    continue
                requests.start_soon(one, clients[index % len(clients)], first_seq + index)
        result.elapsed = time.perf_counter() - start
        for client in clients:
            await client.aclose()
    return result
