"""HTTP/2 abuse against the hub (over mutual TLS) and the local API (h2c):
floods of resets, PINGs, SETTINGS and CONTINUATION frames, too many
streams, oversized header blocks, bodies that never come.  Each attacker
is cut off; legitimate traffic still flows afterwards."""

from __future__ import annotations

import json
import ssl
import struct

import hpack
import hyperframe.frame as hf
import pytest
import trio
from conftest import STEP, Space

from relay.hub import server
from relay.net import local_server

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, ENHANCE_YOUR_CALM = 0x7, 0xB


class RawPeer:
    """A hand-written HTTP/2 client: it sends exactly the frames a test says."""

    def __init__(self, stream: trio.abc.Stream, authority: str) -> None:
        self.stream = stream
        self.encoder = hpack.Encoder()
        self.authority = authority

    @classmethod
    async def to_hub(cls, space: Space) -> RawPeer:
        pki = space.directory / "pki"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=pki / "ca.pem")
        ctx.load_cert_chain(pki / "chu-nord.test.pem", pki / "chu-nord.test.key")
        ctx.set_alpn_protocols(["h2"])
        tcp = await trio.open_tcp_stream("127.0.0.1", space.hub_config.listen.port)
        tls = trio.SSLStream(tcp, ctx, server_hostname="hub.eimis.test")
        await tls.do_handshake()
        return await cls(tls, "hub.eimis.test")._start()

    @classmethod
    async def to_local_api(cls, space: Space) -> RawPeer:
        host, port = space.a.url.removeprefix("http://").split(":")
        return await cls(await trio.open_tcp_stream(host, int(port)), "relay")._start()

    async def _start(self) -> RawPeer:
        await self.send(PREFACE, hf.SettingsFrame(0))
        return self

    async def send(self, *frames: bytes | hf.Frame) -> None:
        await self.stream.send_all(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def headers(self, stream_id: int, method: str, path: str, *, end_stream: bool, end_headers: bool = True,
                extra: list[tuple[str, str]] = ()) -> hf.HeadersFrame:
        frame = hf.HeadersFrame(stream_id)
        frame.data = self.encoder.encode([(":method", method), (":scheme", "https"), (":authority", self.authority),
                                          (":path", path), *extra])
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    async def outcome(self, timeout: float = 5.0) -> tuple[bool, int | None, bytes]:
        """Read until the server closes: (closed, GOAWAY error code, bytes)."""
        received = b""
        with trio.move_on_after(timeout):
            try:
                while chunk := await self.stream.receive_some(65536):
                    received += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return True, _goaway_code(received), received
        return False, _goaway_code(received), received

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _goaway_code(data: bytes) -> int | None:
    offset, code = 0, None
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset:offset + 3], "big")
        if data[offset + 3] == GOAWAY and offset + 9 + 8 <= len(data):
            code = struct.unpack(">I", data[offset + 13:offset + 17])[0]
        offset += 9 + length
    return code


async def _attack(space: Space, target: str, frames_for) -> tuple[bool, int | None]:
    peer = await (RawPeer.to_hub(space) if target == "hub" else RawPeer.to_local_api(space))
    try:
        with trio.fail_after(STEP):
            try:
                await peer.send(*frames_for(peer))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # cut off while still sending: fine
            closed, code, _ = await peer.outcome()
    finally:
        await peer.aclose()
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "business as usual")
    await space.wait_status(space.a, ident, "delivered")
    return closed, code


def _rapid_reset(peer: RawPeer) -> list:
    frames = []
    for n in range(1, 2 * 1200, 2):
        frames.append(peer.headers(n, "GET", "/v1/inbox" if peer.authority != "relay" else "/healthz",
                                   end_stream=True))
        reset = hf.RstStreamFrame(n)
        reset.error_code = 8  # CANCEL
        frames.append(reset)
    return frames


def _pings(peer: RawPeer) -> list:
    frames = []
    for n in range(500):
        ping = hf.PingFrame(0)
        ping.opaque_data = n.to_bytes(8, "big")
        frames.append(ping)
    return frames


def _settings(peer: RawPeer) -> list:
    return [hf.SettingsFrame(0) for _ in range(500)]


def _continuation(peer: RawPeer) -> list:
    frames = [peer.headers(1, "GET", "/healthz", end_stream=True, end_headers=False)]
    for _ in range(2000):
        continuation = hf.ContinuationFrame(1)
        continuation.data = peer.encoder.encode([("x-flood", "a" * 100)])
        frames.append(continuation)
    return frames


def _too_many_streams(peer: RawPeer) -> list:
    # POSTs that never send a body: every stream stays open.
    return [peer.headers(n, "POST", "/v1/ack", end_stream=False) for n in range(1, 2 * 400, 2)]


def _huge_headers(peer: RawPeer) -> list:
    return [peer.headers(1, "GET", "/healthz", end_stream=True, extra=[("x-big", "a" * 64 * 1024)])]


@pytest.mark.parametrize("target", ["hub", "local API"])
@pytest.mark.parametrize(
    ("attack", "frames_for", "calm"),
    [
        ("rapid reset", _rapid_reset, True),
        ("PING flood", _pings, True),
        ("SETTINGS flood", _settings, True),
        ("CONTINUATION flood", _continuation, False),
        ("too many streams", _too_many_streams, False),
        ("header block over the limit", _huge_headers, False),
    ],
)
async def test_http2_abuse_is_cut_off(space: Space, target: str, attack: str, frames_for, calm: bool) -> None:
    closed, code = await _attack(space, target, frames_for)
    assert closed, f"{attack} against the {target}: connection left open"
    if calm:
        assert code == ENHANCE_YOUR_CALM, f"{attack} against the {target}: GOAWAY code {code}"
    else:
        assert code not in (None, 0), f"{attack} against the {target}: closed without an error GOAWAY ({code})"


async def test_a_body_that_never_comes_times_out(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(local_server, "REQUEST_TIMEOUT", 0.5)
    for target, path in (("hub", "/v1/ack"), ("local API", "/v1/messages")):
        peer = await (RawPeer.to_hub(space) if target == "hub" else RawPeer.to_local_api(space))
        try:
            await peer.send(peer.headers(1, "POST", path, end_stream=False))
            _, _, received = await peer.outcome(timeout=3)
        finally:
            await peer.aclose()
        decoder = hpack.Decoder()
        statuses = [dict(decoder.decode(_frame_payload(received, 0x1)))]
        assert statuses[0].get(":status") == "408", (target, statuses)
    ident = await space.send(space.a, ["bob@clinique-sud.test"], "still fine")
    await space.wait_status(space.a, ident, "delivered")


def _frame_payload(data: bytes, frame_type: int) -> bytes:
    """The payload of the first frame of ``frame_type`` in ``data``."""
    offset = 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset:offset + 3], "big")
        if data[offset + 3] == frame_type:
            return data[offset + 9:offset + 9 + length]
        offset += 9 + length
    raise AssertionError(f"no frame of type {frame_type} in {len(data)} bytes")



async def test_the_local_api_checks_what_h2_no_longer_checks(space: Space) -> None:
    """The local API runs h2 without its header checks (they were a fifth of
    a request's CPU): a :path with a line break or a space, a missing
    :path or :method, an Idempotency-Key ending in a newline each get a
    400 of their own, and the connection goes on serving."""
    body = json.dumps({"from": "alice@chu-nord.test", "to": ["bob@clinique-sud.test"], "body": "x"}).encode()
    scheme = [(":scheme", "http"), (":authority", "relay")]
    fields = [("authorization", f"Bearer {space.a.token}"), ("content-type", "application/json")]
    post = [(":method", "POST"), *scheme]
    requests = [
        [*post, (":path", "/v1/messages\r\nx-injected: 1"), *fields],
        [*post, (":path", "/v1/ messages"), *fields],
        [*post, *fields],
        [*scheme, (":path", "/v1/messages"), *fields],
        [*post, (":path", "/v1/messages"), *fields, ("idempotency-key", "order-17\n")],
        [*post, (":path", "/v1/messages"), *fields],
    ]
    peer = await RawPeer.to_local_api(space)
    try:
        frames = []
        for stream_id, headers in zip(range(1, 2 * len(requests), 2), requests, strict=True):
            head, data = hf.HeadersFrame(stream_id), hf.DataFrame(stream_id)
            head.data, data.data = peer.encoder.encode(headers), body
            head.flags.add("END_HEADERS")
            data.flags.add("END_STREAM")
            frames += [head, data]
        await peer.send(*frames)
        statuses = await _statuses(peer, len(requests))
    finally:
        await peer.aclose()
    assert statuses == {1: "400", 3: "400", 5: "400", 7: "400", 9: "400", 11: "202"}


async def _statuses(peer: RawPeer, count: int) -> dict[int, str]:
    """The :status of the first ``count`` responses, by stream."""
    decoder, received, statuses = hpack.Decoder(), b"", {}
    with trio.fail_after(STEP):
        while len(statuses) < count:
            received += await peer.stream.receive_some(65536)
            while len(received) >= 9 and len(received) >= 9 + (length := int.from_bytes(received[:3], "big")):
                kind, stream_id = received[3], int.from_bytes(received[5:9], "big") & 0x7FFFFFFF
                if kind == 0x1:
                    statuses[stream_id] = dict(decoder.decode(received[9:9 + length]))[":status"]
                received = received[9 + length:]
    return statuses
