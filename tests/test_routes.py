"""The relay<->hub routes as data: requests built, answers read, routes
matched and the inbox stream framed and decoded.  No trio, no I/O."""

from __future__ import annotations

import pytest

from relay.core import protocol, routes
from relay.core.protocol import Envelope, Failure, InboxItem, ProtocolViolation, Receipt
from relay.core.routes import HubAnswerError, Route

ALICE = "alice@chu-nord.test"
BOB = "bob@clinique-sud.test"


def envelope(ident: str = "msg-0001_abcdef", body: str = "Compte rendu: RAS.", **fields) -> Envelope:
    return Envelope(ident, ALICE, (BOB,), (BOB,), body, None, "normal", 1_700_000_000.25, **fields)


# -- requests ------------------------------------------------------------------------


def test_a_transaction_is_posted_under_its_id_with_the_envelopes_in_order() -> None:
    envelopes = [envelope("msg-0001_abcdef"), envelope("msg-0002_abcdef")]
    request = routes.transaction("Xq3v9K2mP0aLr8TzW1bN4g", envelopes)
    assert (request.method, request.path, request.content_type) == (
        "POST", "/v1/transactions/Xq3v9K2mP0aLr8TzW1bN4g", b"application/msgpack")
    assert request.body == protocol.encode_transaction(envelopes)
    assert [Envelope.from_wire(e) for e in protocol.decode_transaction(request.body)] == envelopes


def test_an_ack_and_read_receipts_are_posted_to_their_paths() -> None:
    ack = routes.ack([41, 39, 44], [Failure(44, ("nobody@clinique-sud.test",), "unknown_recipient")])
    assert (ack.method, ack.path) == ("POST", "/v1/ack")
    assert protocol.decode_ack(ack.body) == ([41, 39, 44], [Failure(44, ("nobody@clinique-sud.test",),
                                                                    "unknown_recipient")])
    read = [Receipt("msg-0001_abcdef", (BOB,), "read", origin="chu-nord.test")]
    request = routes.receipts(read)
    assert (request.method, request.path) == ("POST", "/v1/receipts")
    assert [Receipt.from_wire(r) for r in protocol.decode_receipts(request.body)] == read


def test_the_inbox_is_a_get_to_the_hubs_name() -> None:
    assert routes.inbox_headers("hub.eimis.test") == [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"hub.eimis.test"),
        (b":path", b"/v1/inbox"),
        (b"accept", b"application/msgpack"),
    ]


# -- answers -------------------------------------------------------------------------


def test_a_200_answer_is_its_body() -> None:
    request = routes.ack([1], [])
    assert routes.answer_body(request, 200, b"\x81\xa1v\x01") == b"\x81\xa1v\x01"
    routes.check_inbox_status(200)


@pytest.mark.parametrize("kind", [routes.BAD_REQUEST, routes.NOT_FOUND, routes.TIMEOUT, routes.TOO_LARGE,
                                  routes.UNAVAILABLE])
def test_every_error_the_hub_answers_is_read_back_by_the_relay(kind: routes.ErrorKind) -> None:
    status, body = kind.answer("why it was refused")
    assert protocol.unpack(body, "error") == {"v": 1, "error": kind.reason, "detail": "why it was refused"}
    with pytest.raises(HubAnswerError) as caught:
        routes.answer_body(routes.ack([1], []), status, body)
    assert caught.value.status == status
    assert str(caught.value) == f"hub answered {status} to /v1/ack: {kind.reason}: why it was refused"


def test_the_statuses_of_the_errors() -> None:
    assert [(k.status, k.reason) for k in (routes.BAD_REQUEST, routes.NOT_FOUND, routes.TIMEOUT,
                                           routes.TOO_LARGE, routes.UNAVAILABLE)] == [
        (400, "bad_request"), (404, "not_found"), (408, "timeout"), (413, "too_large"), (503, "unavailable")]


@pytest.mark.parametrize("body", [b"", b"<html>bad gateway</html>", protocol.pack([1, 2])])
def test_an_unreadable_error_body_is_reported_by_its_size(body: bytes) -> None:
    with pytest.raises(HubAnswerError, match=rf"^hub answered 502 to /v1/receipts: {len(body)} bytes of "
                                             r"unreadable answer$"):
        routes.answer_body(routes.receipts([Receipt("msg-0001_abcdef", (BOB,), "read")]), 502, body)


def test_a_refused_inbox_stream() -> None:
    with pytest.raises(HubAnswerError, match=r"^hub answered 503 to the inbox request$") as caught:
        routes.check_inbox_status(503)
    assert caught.value.status == 503


# -- routing (hub side) --------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "expected"), [
    (b"POST", "/v1/transactions/Xq3v9K2mP0aLr8TzW1bN4g", (Route.TRANSACTION, "Xq3v9K2mP0aLr8TzW1bN4g")),
    (b"GET", "/v1/inbox", (Route.INBOX, "")),
    (b"POST", "/v1/ack", (Route.ACK, "")),
    (b"POST", "/v1/receipts", (Route.RECEIPTS, "")),
    (b"GET", "/v1/ack", None),
    (b"POST", "/v1/inbox", None),
    (b"GET", "/v1/transactions/Xq3v9K2mP0aLr8TzW1bN4g", None),
    (b"POST", "/v1/ack/", None),
    (b"POST", "/v2/ack", None),
    (None, "/v1/ack", None),
])
def test_match(method: bytes | None, path: str, expected: tuple[Route, str] | None) -> None:
    assert routes.match(method, path) == expected


@pytest.mark.parametrize("txn_id", ["", "short", "x" * 65, "has space", "a/b/c/d/e/f", "dots.are.not.ok"])
def test_a_transaction_id_that_is_not_a_token_is_a_bad_request(txn_id: str) -> None:
    with pytest.raises(ProtocolViolation, match=r"^transaction id: expected 8-64 characters"):
        routes.match(b"POST", "/v1/transactions/" + txn_id)


def test_every_request_the_relay_builds_is_routed_by_the_hub() -> None:
    requests = [routes.transaction("Xq3v9K2mP0aLr8TzW1bN4g", [envelope()]), routes.ack([1], []),
                routes.receipts([Receipt("msg-0001_abcdef", (BOB,), "read", origin="chu-nord.test")])]
    assert [routes.match(r.method.encode(), r.path) for r in requests] == [
        (Route.TRANSACTION, "Xq3v9K2mP0aLr8TzW1bN4g"), (Route.ACK, ""), (Route.RECEIPTS, "")]
    headers = dict(routes.inbox_headers("hub.eimis.test"))
    assert routes.match(headers[b":method"], headers[b":path"].decode()) == (Route.INBOX, "")


# -- the inbox stream ----------------------------------------------------------------


def items() -> list[InboxItem]:
    return [
        InboxItem(41, envelope=envelope(origin="chu-nord.test", origin_org="1750000001")),
        InboxItem(39, receipt=Receipt("msg-0009_abcdef", (ALICE,), "delivered")),
        InboxItem(58, receipt=Receipt("msg-0008_abcdef", (ALICE,), "failed", "unknown_recipient")),
        InboxItem(2**40, envelope=envelope("msg-0003_abcdef", body="é" * 1000, origin="chu-nord.test")),
    ]


def frame(item: InboxItem) -> bytes:
    """The hub's frame of an item, from its stored payload."""
    if item.envelope is not None:
        return routes.inbox_frame(item.seq, "message", protocol.pack(item.envelope.to_wire()))
    assert item.receipt is not None
    return routes.inbox_frame(item.seq, "receipt", protocol.pack(item.receipt.to_wire()))


def test_a_frame_is_the_items_own_msgpack_map() -> None:
    for item in items():
        assert frame(item) == protocol.pack(item.to_wire())


def test_frames_fed_byte_by_byte_come_out_as_each_one_completes() -> None:
    stream = b"".join(frame(item) for item in items())
    decoder = routes.InboxDecoder()
    got = [(offset + 1, item) for offset in range(len(stream)) for item in decoder.feed(stream[offset:offset + 1])]
    ends = [sum(len(frame(i)) for i in items()[:n + 1]) for n in range(len(items()))]
    assert got == list(zip(ends, items(), strict=True))


def test_one_feed_larger_than_the_decoders_bound_is_decoded_in_slices() -> None:
    """HTTP/2 hands over what arrived, which may be several maximal items
    at once: more than the decoder holds undecoded."""
    domain = ".".join(["d" * 63] * 3 + ["d" * 61])  # 253 characters, the longest valid domain
    to = tuple(f"u{i:03d}{'a' * 60}@{domain}" for i in range(protocol.MAX_RECIPIENTS))
    big = Envelope("i" * 64, to[0], to, to, "é" * (protocol.MAX_BODY_BYTES // 2), "\u20ac" * protocol.MAX_THREAD_CHARS,
                   "urgent", 1_700_000_000.0, origin=domain)
    item = InboxItem(7, envelope=big)
    data = frame(item) * 4
    assert len(data) > 2 * protocol.MAX_ITEM_BYTES
    assert routes.InboxDecoder().feed(data) == [item] * 4


@pytest.mark.parametrize(("data", "error"), [
    (b"\xc1", "inbox stream: undecodable item"),  # never used in msgpack
    (protocol.pack({"seq": 1, "kind": "telegram"}), "item.kind: unknown kind 'telegram'"),
    (protocol.pack({"seq": True, "kind": "message"}), "seq: expected int"),
    (protocol.pack([1, 2, 3]), "item: expected a map"),
    (b"\x81\xa3seq\xd6\xff\x00\x00\x00\x01", "inbox stream: undecodable item"),  # a msgpack timestamp
])
def test_what_the_decoder_refuses(data: bytes, error: str) -> None:
    decoder = routes.InboxDecoder()
    assert decoder.feed(frame(items()[1])) == [items()[1]]
    with pytest.raises(ProtocolViolation, match=f"^{error}"):
        decoder.feed(data)


def test_a_huge_declared_item_is_refused_once_the_decoder_holds_its_bound() -> None:
    """A str claiming three times the largest item: the decoder holds what
    comes, up to twice the largest item, then gives up (msgpack 1.0.3,
    Debian 12's, refuses the declared length at once: over the string cap)."""
    decoder = routes.InboxDecoder()
    chunk = 64 * 1024  # a DATA frame
    fed = 0
    with pytest.raises(ProtocolViolation, match=r"^inbox stream: undecodable item \((BufferFull|ValueError)\)$"):
        decoder.feed(b"\xdb" + (protocol.MAX_ITEM_BYTES * 3).to_bytes(4, "big"))
        while fed < 3 * protocol.MAX_ITEM_BYTES:
            assert decoder.feed(b"x" * chunk) == []
            fed += chunk
    assert fed <= 2 * protocol.MAX_ITEM_BYTES


def test_an_error_answer_is_cut_to_a_line_in_the_log() -> None:
    long = routes.error_text(protocol.encode_error("bad_request", "x" * 100_000))
    assert long.startswith("bad_request: xxx") and len(long) == routes.ERROR_TEXT_CHARS + 1
    assert routes.error_text(protocol.encode_error("bad_request", "why")) == "bad_request: why"
