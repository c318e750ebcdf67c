"""Reaching the hub through a hospital's HTTP CONNECT proxy.

The proxy only ever sees ``CONNECT host:port``: TLS runs end to end between
the relay and the hub inside the tunnel, so the proxy can neither read nor
alter what passes.  h11 parses the proxy's answer.
"""

from __future__ import annotations

import base64

import h11
import trio

from relay.config.vocabulary import Proxy


class ProxyError(ConnectionError):
    """The proxy refused or broke the tunnel; the message says how."""


async def dial(host: str, port: int, proxy: Proxy | None) -> trio.SocketStream:
    """A TCP stream to ``host:port``, through ``proxy`` when there is one.

    Raises `OSError` when a connection fails (`ProxyError` is one); the
    caller puts the deadline around it."""
    if proxy is not None:
        return await open_tunnel(proxy, host, port)
    return await trio.open_tcp_stream(host, port)


async def open_tunnel(proxy: Proxy, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``host:port`` through ``proxy``, ready for TLS."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        await _connect(stream, proxy, f"{host}:{port}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _connect(stream: trio.SocketStream, proxy: Proxy, target: str) -> None:
    client = h11.Connection(our_role=h11.CLIENT)
    headers = [("Host", target)]
    if proxy.username is not None:
        password = proxy.password.reveal() if proxy.password is not None else ""
        credentials = f"{proxy.username}:{password}".encode()
        headers.append(("Proxy-Authorization", "Basic " + base64.b64encode(credentials).decode()))
    await stream.send_all(client.send(h11.Request(method="CONNECT", target=target, headers=headers)))
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                raise ProxyError(f"proxy {proxy.host}:{proxy.port} closed the connection during CONNECT")
            client.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            if 200 <= event.status_code < 300:
                if client.trailing_data[0]:
                    raise ProxyError("proxy sent data before the tunnel was established")
                return
            reason = event.reason.decode("latin-1", "replace")
            raise ProxyError(f"proxy {proxy.host}:{proxy.port} refused CONNECT {target}: {event.status_code} {reason}")
        if isinstance(event, h11.InformationalResponse):
            continue
        raise ProxyError(f"unexpected answer from proxy {proxy.host}:{proxy.port}: {event!r}")
