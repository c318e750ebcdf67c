"""The local API's listener, alone, over real sockets on loopback: no slot is
held for nothing (a connection that sends nothing, a TLS handshake never
made, an HTTP/2 preface and no request, kept-alive connections when a new
one needs a slot), and shutdown takes no new request on any connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import h11
import hyperframe.frame as hf
import pytest
import trio
import trio.testing

from relay.net import local_server
from relay.net.local_server import HttpServer, Request, Response
from relay.net.tls import local_server_context
from relay.pki import authority

STEP = 10.0
HEAD = 0.3  # HEAD_TIMEOUT in these tests: a connection that says nothing is cut after it
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Server:
    """An `HttpServer` on 127.0.0.1 whose ``/slow`` requests wait for `release`."""

    def __init__(self, **kwargs) -> None:
        self.release = trio.Event()
        self.http = HttpServer(self._app, max_body=1024, too_large=lambda: Response(413), **kwargs)
        self.port = 0

    async def _app(self, request: Request) -> Response:
        if request.path == "/slow":
            await self.release.wait()
        return Response.json(200, {"path": request.path})

    async def start(self, nursery: trio.Nursery) -> Server:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await nursery.start(self.http.serve, listeners)
        return self

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


async def _closed_after(stream: trio.abc.Stream) -> float:
    """Seconds until the server closes ``stream`` (whatever it sends first:
    HTTP/2 SETTINGS and their acknowledgement)."""
    started = trio.current_time()
    with trio.fail_after(STEP):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # a reset is a close too
    return trio.current_time() - started


async def _get(stream: trio.abc.Stream, path: str) -> tuple[int, dict[bytes, bytes]]:
    """One HTTP/1.1 GET on a kept-alive connection: (status, headers)."""
    client = h11.Connection(h11.CLIENT)
    await stream.send_all(client.send(h11.Request(method="GET", target=path, headers=[("host", "relay")])))
    with trio.fail_after(STEP):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                return event.status_code, dict(event.headers)


@pytest.fixture
def short_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_server, "HEAD_TIMEOUT", HEAD, raising=False)  # (also runs, and fails, on code without it)


@pytest.mark.parametrize("sent", [b"", b"G", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", PREFACE,
                                  PREFACE + hf.SettingsFrame(0).serialize()])
async def test_a_connection_that_does_not_ask_is_closed_after_the_head_timeout(
        nursery: trio.Nursery, short_head: None, sent: bytes) -> None:
    """Nothing, one byte, a head never finished, an HTTP/2 preface and no
    request: each holds a slot for HEAD_TIMEOUT, not the 120 s of an idle
    keep-alive nor the 30 s given to a body."""
    server = await Server().start(nursery)
    async with await server.connect() as stream:
        await stream.send_all(sent)
        if sent.startswith(PREFACE):
            with trio.fail_after(STEP):  # the server's SETTINGS first
                assert await stream.receive_some(65536)
        elapsed = await _closed_after(stream)
    assert HEAD * 0.9 <= elapsed < STEP / 2


async def test_a_tls_handshake_that_never_comes_is_cut_at_the_head_timeout(
        nursery: trio.Nursery, short_head: None, tmp_path: Path) -> None:
    ca, ca_key = authority.create_ca(tmp_path)
    cert, key = authority.issue_certificate(ca, ca_key, tmp_path / "local", dns_names=["localhost"],
                                            ip_addresses=["127.0.0.1"], role="local")
    server = await Server(tls=local_server_context(cert, key)).start(nursery)
    async with await server.connect() as stream:
        elapsed = await _closed_after(stream)
    assert HEAD * 0.9 <= elapsed < STEP / 2
    # A real client still gets in.
    context = ssl.create_default_context(cafile=ca)
    async with trio.SSLStream(await server.connect(), context, server_hostname="127.0.0.1") as tls:
        assert (await _get(tls, "/healthz"))[0] == 200


async def test_kept_alive_connections_give_way_to_a_new_one(nursery: trio.Nursery) -> None:
    """Every slot held by a kept-alive connection between requests: a new
    connection closes the longest idle one and is served."""
    server = await Server(max_connections=2).start(nursery)
    first, second = await server.connect(), await server.connect()
    assert (await _get(first, "/a"))[0] == (await _get(second, "/b"))[0] == 200
    async with await server.connect() as third:
        assert (await _get(third, "/c"))[0] == 200
    assert await _closed_after(first) < STEP / 2
    assert (await _get(second, "/still-here"))[0] == 200
    await first.aclose()
    await second.aclose()


async def test_no_new_request_is_taken_once_shutdown_begins(nursery: trio.Nursery) -> None:
    """A request in flight keeps shutdown waiting (its grace); meanwhile a
    kept-alive HTTP/1.1 connection is closed rather than served, and the
    answer in flight says ``Connection: close``."""
    server = await Server().start(nursery)
    idle, busy = await server.connect(), await server.connect()
    assert (await _get(idle, "/before"))[0] == 200
    answer: dict = {}

    async def slow() -> None:
        answer["status"], answer["headers"] = await _get(busy, "/slow")

    nursery.start_soon(slow)
    await trio.testing.wait_all_tasks_blocked()  # /slow is in flight
    done = trio.Event()

    async def shut_down() -> None:
        await server.http.shutdown(STEP)
        done.set()

    nursery.start_soon(shut_down)
    await trio.testing.wait_all_tasks_blocked()  # shutdown waits for /slow
    assert await _closed_after(idle) < STEP / 2  # the kept-alive connection: closed, not served
    server.release.set()
    with trio.fail_after(STEP):
        await done.wait()
    assert answer["status"] == 200 and answer["headers"][b"connection"] == b"close"
    await idle.aclose()
    await busy.aclose()
