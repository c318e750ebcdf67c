"""Test doubles for the relay's peers on loopback: a local system's webhook
endpoint, a TCP forwarder that can go silent like a dead link, a client
that speaks the national protocol to the hub the way a relay does, and a
hub that keeps a connection alive but leaves requests unanswered."""

from __future__ import annotations

from pathlib import Path

import h11
import trio
from processes import STEP

from relay.core import h2session, protocol, routes
from relay.net import h2connection
from relay.net.tls import hub_server_context, relay_client_context


class LoopbackServer:
    """A test server on 127.0.0.1 and a port the kernel picks; subclasses
    handle each connection in `_handle`."""

    port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with listeners[0]:
            await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError


class WebhookReceiver(LoopbackServer):
    """A local system's webhook endpoint: records what it gets, and fails
    or hangs on request to exercise the retries."""

    def __init__(self) -> None:
        self.received: list[tuple[dict, bytes]] = []
        self.attempts: list[str] = []  # the Event-Id of every attempt
        self.fail_next = 0
        self.hang_next = 0


    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            headers, body = {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            self.attempts.append(headers["event-id"])
            if self.hang_next:
                self.hang_next -= 1
                await trio.sleep_forever()
            status = 500 if self.fail_next else 204
            if self.fail_next:
                self.fail_next -= 1
            else:
                self.received.append((headers, body))
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[("content-length", "0")]))
                                  + conn.send(h11.EndOfMessage()))


class SilentLink(LoopbackServer):
    """Forwards TCP connections to ``target_port``; `go_silent` makes every
    connection open at that moment stop forwarding without closing (no FIN,
    no RST), as a broken firewall or a dead route would.  New connections
    are forwarded normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._live: list[trio.CancelScope] = []


    def go_silent(self) -> None:
        for scope in self._live:
            scope.cancel()
        self._live.clear()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:  # the target is not listening (yet): like a refused connection
            await client.aclose()
            return
        async with client, upstream:
            with trio.CancelScope() as scope:
                self._live.append(scope)
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(pipe, upstream, client, nursery.cancel_scope)
            if scope.cancelled_caught:
                await trio.sleep_forever()  # silent: hold both sockets open, forward nothing


async def read_head(client: trio.SocketStream) -> bytes | None:
    """An HTTP/1.1 request head (a proxy's CONNECT), or None if the client left."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await client.receive_some(4096)
        if not chunk:
            return None
        head += chunk
    return head


async def pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    """Copy one direction of a tunnel; when it ends, end the other too."""
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


class HubClient:
    """Speaks the national protocol to the hub with a relay's own certificate,
    to replay what a relay would only send again after a crash."""

    AUTHORITY = "hub.eimis.test"

    def __init__(self, directory: Path, domain: str, hub_url: str) -> None:
        pki = directory / "pki"
        self.context = relay_client_context(pki / f"{domain}.pem", pki / f"{domain}.key", pki / "ca.pem")
        self.port = int(hub_url.rsplit(":", 1)[1])

    async def __aenter__(self) -> HubClient:
        tcp = await trio.open_tcp_stream("127.0.0.1", self.port)
        tls = trio.SSLStream(tcp, self.context, server_hostname=self.AUTHORITY)
        await tls.do_handshake()
        self.conn = h2connection.Http2Connection(tls, client=True, name="hub")
        self._nursery_manager = trio.open_nursery(strict_exception_groups=True)
        nursery = await self._nursery_manager.__aenter__()
        await nursery.start(self.conn.run)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.conn.abort()
        await self._nursery_manager.__aexit__(*exc_info)

    async def post(self, request: routes.Request) -> bytes:
        """The body of the hub's 200 answer (`routes.HubAnswerError` otherwise)."""
        status, answer = await self.conn.request(request.method, request.path, request.body,
                                                 authority=self.AUTHORITY, content_type=request.content_type,
                                                 limit=routes.ANSWER_LIMIT)
        return routes.answer_body(request, status, answer)

    async def inbox_until(self, ident: str) -> list[protocol.InboxItem]:
        """The inbox's items up to the one about message ``ident``, a marker
        queued after what the test looks at: the hub sends a lane in
        queue order, so anything else queued before it comes first."""
        stream = self.conn.open_stream(routes.inbox_headers(self.AUTHORITY), end_stream=True)
        routes.check_inbox_status(h2session.status_of(await stream.receive_headers()))
        decoder = routes.InboxDecoder()
        items: list[protocol.InboxItem] = []
        with trio.fail_after(STEP):
            while not any((item.envelope or item.receipt).id == ident for item in items):
                items += decoder.feed(await stream.receive_some())
        stream.reset()
        return items


class StallingHub(LoopbackServer):
    """A hub played on loopback with the demo hub's certificate: real TLS,
    real HTTP/2, PINGs answered (the connection's reader does that).  It
    takes the inbox request and keeps the stream quiet, and leaves every
    transaction (or, with ``stall="ack"``, every ack) unanswered until the
    test sets ``answering``; then it answers them.  For each message it
    took it sends a ``delivered`` receipt on the inbox stream, and again on
    each new inbox stream until the relay's ack of it is answered.

    ``requests`` records (connection number, path, message ids) of every
    transaction and ack it received."""

    def __init__(self, pki: Path, *, stall: str = "transaction") -> None:
        self.context = hub_server_context(pki / "hub.eimis.test.pem", pki / "hub.eimis.test.key", pki / "ca.pem")
        self.stall = stall
        self.connections = 0
        self.requests: list[tuple[int, str, list[str]]] = []
        self.answering = trio.Event()
        self._inbox: dict[int, h2connection.H2Stream] = {}
        self._seq = 0
        self._unacked: dict[int, bytes] = {}

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        tls = trio.SSLStream(tcp, self.context, server_side=True)
        try:
            with trio.fail_after(STEP):
                await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError):
            await trio.aclose_forcefully(tls)
            return
        conn = h2connection.Http2Connection(tls, client=False, name=f"relay {number}",
                                            settings=h2session.Http2Settings(keepalive_interval=None))
        try:
            await conn.run(lambda stream: self._serve(number, stream))
        finally:
            self._inbox.pop(number, None)

    async def _serve(self, number: int, stream: h2connection.H2Stream) -> None:
        path = h2session.header(stream.headers, b":path").decode()
        if path == routes.PATH_INBOX:
            stream.send_headers([(b":status", b"200"), (b"content-type", protocol.MSGPACK)])
            self._inbox[number] = stream
            if self._unacked:
                await stream.send_data(b"".join(self._unacked.values()))
            await trio.sleep_forever()
        body = await stream.read_body(protocol.MAX_TRANSACTION_BYTES)
        if path.startswith(routes.PATH_TRANSACTION):
            envelopes = [protocol.Envelope.from_wire(e) for e in protocol.decode_transaction(body)]
            self.requests.append((number, path, [e.id for e in envelopes]))
            if self.stall == "transaction":
                await self.answering.wait()
            answer = protocol.encode_outcomes([protocol.Outcome(True)] * len(envelopes))
            await stream.send_response(200, [(b"content-type", protocol.MSGPACK)], answer)
            frames = b""
            for envelope in envelopes:
                self._seq += 1
                receipt = protocol.Receipt(envelope.id, tuple(envelope.rcpt), "delivered")
                self._unacked[self._seq] = routes.inbox_frame(self._seq, "receipt", protocol.pack(receipt.to_wire()))
                frames += self._unacked[self._seq]
            if number in self._inbox:
                await self._inbox[number].send_data(frames)
        elif path == routes.PATH_ACK:
            seqs, _ = protocol.decode_ack(body)
            self.requests.append((number, path, [str(seq) for seq in seqs]))
            if self.stall == "ack":
                await self.answering.wait()
            for seq in seqs:
                self._unacked.pop(seq, None)
            await stream.send_response(200, [(b"content-type", protocol.MSGPACK)],
                                       protocol.pack({"v": protocol.VERSION}))
        else:
            await stream.send_response(200, [(b"content-type", protocol.MSGPACK)], protocol.encode_outcomes([]))
