"""The uplink through a hospital's HTTP CONNECT proxy: TLS stays end to end."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
import trio
from conftest import Space
from peers import LoopbackServer, pipe, read_head

from relay.config.vocabulary import Proxy


class ConnectProxy(LoopbackServer):
    """A minimal CONNECT proxy that records what it was asked, and can
    demand basic credentials."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.requests: list[bytes] = []


    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = await read_head(client)
            if head is None:
                return
            self.requests.append(head)
            request_line = head.split(b"\r\n")[0].decode()
            _method, target, _ = request_line.split(" ")
            if self.credentials is not None:
                expected = base64.b64encode(":".join(self.credentials).encode())
                if b"Proxy-Authorization: Basic " + expected not in head:
                    await client.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                    return
            host, port = target.rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as upstream:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(pipe, upstream, client, nursery.cancel_scope)


@pytest.mark.parametrize("credentials", [None, ("relay", "s3cret")])
async def test_uplink_through_proxy(stopped_space: Space, credentials: tuple[str, str] | None) -> None:
    space = stopped_space
    proxy = ConnectProxy(credentials)
    await space.nursery.start(proxy.serve)
    await space.start_hub()
    user, password = credentials or (None, None)
    space.a.config = replace(space.a.config, uplink=replace(
        space.a.config.uplink, proxy=Proxy("127.0.0.1", proxy.port, user, password)))
    for relay in space.relays:
        await space.start_relay(relay)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "via the proxy")
    [event] = await space.events(space.b, 1)
    assert event["message"]["id"] == ident
    await space.wait_status(space.a, ident, "delivered")
    hub_port = space.hub_config.listen.port
    assert proxy.requests[0].startswith(f"CONNECT 127.0.0.1:{hub_port} HTTP/1.1\r\n".encode())
    # The proxy saw the CONNECT line and TLS records, never the message.
    assert all(b"via the proxy" not in r for r in proxy.requests)


async def test_proxy_refusal_is_reported_and_retried(stopped_space: Space) -> None:
    space = stopped_space
    proxy = ConnectProxy(credentials=("relay", "right"))
    await space.nursery.start(proxy.serve)
    await space.start_hub()
    space.a.config = replace(space.a.config, uplink=replace(
        space.a.config.uplink, proxy=Proxy("127.0.0.1", proxy.port, "relay", "wrong"), backoff_initial=0.05))
    await space.start_relay(space.a, wait_connected=False)
    with trio.fail_after(10):
        while len(proxy.requests) < 2:  # refused, then tried again after a backoff
            await trio.sleep(0.02)
    async with space.a.client() as client:
        health = (await client.get("/healthz")).json()
    assert health["uplink"] in ("down", "connecting")


class MuteProxy(LoopbackServer):
    """A proxy that takes the TCP connection and never answers CONNECT."""

    def __init__(self) -> None:
        self.connections = 0

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            await trio.sleep_forever()


async def test_a_proxy_that_never_answers_connect_is_given_up_named_and_retried(stopped_space: Space) -> None:
    space = stopped_space
    proxy = MuteProxy()
    await space.nursery.start(proxy.serve)
    await space.start_hub()
    space.a.config = replace(space.a.config, uplink=replace(
        space.a.config.uplink, proxy=Proxy("127.0.0.1", proxy.port, None, None), connect_timeout=0.3,
        backoff_initial=0.05))
    await space.start_relay(space.a, wait_connected=False)
    with trio.fail_after(10):
        while proxy.connections < 2:  # given up after connect_timeout, then tried again
            await trio.sleep(0.02)
        while not (status := await space.daemon_status(space.a))["uplink"]["last_error"]:
            await trio.sleep(0.02)
    assert status["uplink"]["last_error"] == ("TCP connection to the proxy and its answer to CONNECT not done"
                                              " within connect_timeout (0.3 s)")
