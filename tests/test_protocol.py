"""The v1 codec as bytes in, objects or `ProtocolViolation` out: no trio, no I/O."""

from __future__ import annotations

import math
import re

import msgpack
import pytest

from relay.core import protocol
from relay.core.protocol import Envelope, Failure, InboxItem, Outcome, ProtocolViolation, Receipt

ALICE = "alice@chu-nord.test"
BOB = "bob@clinique-sud.test"
CAROL = "carol@clinique-sud.test"
DAVE = "dave@ehpad-est.test"


def envelope(**overrides) -> Envelope:
    fields = dict(
        id="msg-0001_abcdef",
        sender=ALICE,
        to=(BOB, CAROL, DAVE),
        rcpt=(BOB, CAROL),
        body="Compte rendu: RAS.",
        thread="dossier-42",
        priority="normal",
        sent_at=1_700_000_000.25,
    )
    fields.update(overrides)
    return Envelope(**fields)


def wire(**overrides) -> dict:
    """A valid envelope map, as a peer would send it, with fields replaced
    (or removed, with the value `DROP`)."""
    m = envelope().to_wire()
    for key, value in overrides.items():
        if value is DROP:
            m.pop(key)
        else:
            m[key] = value
    return m


DROP = object()


def violation(fn, *args) -> str:
    with pytest.raises(ProtocolViolation) as info:
        fn(*args)
    return str(info.value)


# -- round trips through the wire -----------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        envelope(),
        envelope(thread=None, priority="urgent", sent_at=0.0),
        envelope(origin="chu-nord.test"),
        envelope(body="é" * 10 + "\u20ac\U0001f600", to=(BOB,), rcpt=(BOB,)),
        envelope(body="x" * protocol.MAX_BODY_BYTES),
    ],
)
def test_envelope_round_trips_through_pack_and_unpack(env: Envelope) -> None:
    back = Envelope.from_wire(protocol.unpack(protocol.pack(env.to_wire()), "envelope"))
    assert back == env
    assert back.dest == "clinique-sud.test"
    assert isinstance(back.to, tuple) and isinstance(back.rcpt, tuple)


def test_envelope_without_origin_omits_the_key_on_the_wire() -> None:
    assert "origin" not in envelope().to_wire()
    assert envelope(origin="chu-nord.test").to_wire()["origin"] == "chu-nord.test"


def test_integer_sent_at_is_accepted_as_a_float() -> None:
    back = Envelope.from_wire(wire(sent_at=1_700_000_000))
    assert back.sent_at == 1_700_000_000.0 and isinstance(back.sent_at, float)


@pytest.mark.parametrize(
    "receipt",
    [
        Receipt("msg-0001_abcdef", (BOB, CAROL), "delivered"),
        Receipt("msg-0001_abcdef", (BOB,), "failed", protocol.UNKNOWN_RECIPIENT),
    ],
)
def test_receipt_round_trips(receipt: Receipt) -> None:
    assert Receipt.from_wire(protocol.unpack(protocol.pack(receipt.to_wire()), "receipt")) == receipt


@pytest.mark.parametrize(
    "item",
    [
        InboxItem(7, envelope=envelope(origin="chu-nord.test")),
        InboxItem(2**40, receipt=Receipt("msg-0001_abcdef", (ALICE,), "delivered")),
    ],
)
def test_inbox_item_round_trips(item: InboxItem) -> None:
    assert InboxItem.from_wire(protocol.unpack(protocol.pack(item.to_wire()), "item")) == item


@pytest.mark.parametrize(
    "outcome",
    [Outcome(True), Outcome(False, protocol.UNKNOWN_DOMAIN, "no relay is registered for x.test"),
     Outcome(False, protocol.INVALID_ENVELOPE)],
)
def test_outcomes_round_trip_through_the_results_body(outcome: Outcome) -> None:
    body = protocol.encode_outcomes([outcome, Outcome(True)])
    assert protocol.decode_outcomes(body, 2) == [outcome, Outcome(True)]


def test_failure_round_trips_through_an_ack() -> None:
    failures = [Failure(3, (BOB,), protocol.UNKNOWN_RECIPIENT), Failure(9, (BOB, CAROL), "misrouted")]
    assert protocol.decode_ack(protocol.encode_ack([3, 5, 9], failures)) == ([3, 5, 9], failures)


def test_transaction_round_trips() -> None:
    envelopes = [envelope(), envelope(id="msg-0002_abcdef", priority="urgent")]
    raw = protocol.decode_transaction(protocol.encode_transaction(envelopes))
    assert [Envelope.from_wire(e) for e in raw] == envelopes


# -- envelope validation: every error names its field ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        # rcpt
        ({"rcpt": [BOB, DAVE], "to": [BOB, DAVE]}, "envelope.rcpt: recipients of more than one domain"),
        ({"rcpt": [BOB, CAROL], "to": [BOB]}, "envelope.rcpt: not a subset"),
        ({"rcpt": []}, "rcpt: expected 1 to"),
        ({"rcpt": DROP}, "rcpt: expected 1 to"),
        ({"rcpt": BOB}, "rcpt: expected 1 to"),
        ({"rcpt": [BOB, BOB]}, "rcpt: duplicate address"),
        ({"rcpt": ["Bob@clinique-sud.test"]}, "rcpt: expected addresses"),
        ({"rcpt": ["bob@localhost"]}, "rcpt: expected addresses"),
        ({"rcpt": [b"bob@clinique-sud.test"]}, "rcpt: expected addresses"),
        # to
        ({"to": [f"u{i}@clinique-sud.test" for i in range(protocol.MAX_RECIPIENTS + 1)]},
         f"to: expected 1 to {protocol.MAX_RECIPIENTS} addresses"),
        ({"to": [BOB, CAROL, BOB]}, "to: duplicate address"),
        ({"to": [BOB, CAROL, 42]}, "to: expected addresses"),
        ({"to": {"a": BOB}}, "to: expected 1 to"),
        # body
        ({"body": "x" * (protocol.MAX_BODY_BYTES + 1)}, "envelope.body: larger than"),
        # counted in UTF-8 bytes, not characters
        ({"body": "é" * (protocol.MAX_BODY_BYTES // 2 + 1)}, "envelope.body: larger than"),
        ({"body": b"bytes"}, "body: expected str"),
        ({"body": DROP}, "body: expected str"),
        # thread
        ({"thread": "t" * (protocol.MAX_THREAD_CHARS + 1)}, "envelope.thread:"),
        ({"thread": 7}, "envelope.thread:"),
        # priority
        ({"priority": "high"}, "envelope.priority: expected 'normal' or 'urgent'"),
        ({"priority": 1}, "priority: expected str"),
        # from
        ({"from": "alice"}, "envelope.from: expected an address"),
        ({"from": None}, "from: expected str"),
        # id
        ({"id": "short"}, "envelope.id:"),
        ({"id": "has spaces in it"}, "envelope.id:"),
        ({"id": "x" * 65}, "envelope.id:"),
        ({"id": 12345678}, "id: expected str"),
        # sent_at, bools are not numbers
        ({"sent_at": True}, "envelope.sent_at:"),
        ({"sent_at": "2024-01-01"}, "envelope.sent_at:"),
        ({"sent_at": DROP}, "envelope.sent_at:"),
        ({"sent_at": math.nan}, "envelope.sent_at:"),
        ({"sent_at": math.inf}, "envelope.sent_at:"),
        ({"sent_at": 1e300}, "envelope.sent_at:"),
        ({"sent_at": -1.0}, "envelope.sent_at:"),
        # origin
        ({"origin": 1}, "envelope.origin: expected a string"),
    ],
)
def test_invalid_envelopes_name_the_field(overrides: dict, field: str) -> None:
    assert violation(Envelope.from_wire, wire(**overrides)).startswith(field)


def test_an_envelope_must_be_a_map() -> None:
    assert violation(Envelope.from_wire, [1, 2]) == "envelope: expected a map"


@pytest.mark.parametrize("text", ["bob@clinique-sud.test\n", "bob@clinique-sud.test\r\n", "\nbob@clinique-sud.test"])
def test_an_address_with_a_newline_is_not_an_address(text: str) -> None:
    # "$" in a regular expression also matches before a final newline.
    assert not protocol.is_address(text)
    assert "rcpt" in violation(Envelope.from_wire, wire(rcpt=[text], to=[text]))


def test_a_token_with_a_newline_is_not_a_token() -> None:
    assert protocol.is_token("abcdefgh")
    assert not protocol.is_token("abcdefgh\n")


def test_address_length_is_bounded() -> None:
    local = "a" * 64
    domain = ".".join(["d" * 63] * 3 + ["d" * 61])  # the longest DNS name, 253 characters
    assert protocol.is_address(f"{local}@{domain}")  # 318 characters
    assert not protocol.is_address(f"{local}a@{domain}")
    assert not protocol.is_address(f"{local}@{domain}x")


def test_sent_at_bounds() -> None:
    assert Envelope.from_wire(wire(sent_at=0)).sent_at == 0.0
    assert Envelope.from_wire(wire(sent_at=protocol.MAX_SENT_AT - 1)).sent_at == protocol.MAX_SENT_AT - 1
    violation(Envelope.from_wire, wire(sent_at=protocol.MAX_SENT_AT))


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"id": "msg-0001_abcdef", "rcpt": [BOB], "status": "opened"}, "receipt.status"),
        ({"id": "msg-0001_abcdef", "rcpt": [BOB], "status": "failed", "reason": 3}, "receipt.reason"),
        ({"id": "bad id", "rcpt": [BOB], "status": "delivered"}, "receipt.id"),
        ({"id": "msg-0001_abcdef", "rcpt": [], "status": "delivered"}, "rcpt:"),
        ({"id": "msg-0001_abcdef", "rcpt": [BOB], "status": True}, "status: expected str"),
    ],
)
def test_invalid_receipts_name_the_field(obj: dict, field: str) -> None:
    assert violation(Receipt.from_wire, obj).startswith(field)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"seq": True, "kind": "receipt", "receipt": {}}, "seq: expected int"),
        ({"seq": 1.0, "kind": "receipt", "receipt": {}}, "seq: expected int"),
        ({"seq": 1, "kind": "gossip"}, "item.kind: unknown kind 'gossip'"),
        ({"seq": 1, "kind": "message"}, "envelope: expected a map"),
        ({"seq": 1, "kind": "receipt", "receipt": "x"}, "receipt: expected a map"),
        ("item", "item: expected a map"),
    ],
)
def test_invalid_inbox_items_name_the_field(obj: object, field: str) -> None:
    assert violation(InboxItem.from_wire, obj).startswith(field)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"ok": 1}, "ok: expected bool"),
        ({"ok": False}, "reason: expected str"),
        ({"ok": False, "reason": "x", "detail": ["not", "text"]}, "result.detail"),
    ],
)
def test_invalid_outcomes_name_the_field(obj: dict, field: str) -> None:
    assert violation(Outcome.from_wire, obj).startswith(field)


def test_invalid_failure_names_the_field() -> None:
    assert violation(Failure.from_wire, {"seq": False, "rcpt": [BOB], "reason": "x"}).startswith("seq:")
    assert violation(Failure.from_wire, {"seq": 1, "rcpt": [BOB], "reason": None}).startswith("reason:")


# -- transactions, results and acks ---------------------------------------------------------


def test_decode_transaction_returns_raw_envelopes_for_per_envelope_checks() -> None:
    body = protocol.pack({"v": 1, "envelopes": [wire(), {"junk": True}]})
    assert protocol.decode_transaction(body) == [wire(), {"junk": True}]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"v": 1, "envelopes": []}, "transaction.envelopes: expected a non-empty array"),
        ({"v": 1}, "transaction.envelopes: expected a non-empty array"),
        ({"v": 1, "envelopes": {"0": {}}}, "transaction.envelopes: expected a non-empty array"),
        ({"v": 1, "envelopes": [{}] * (protocol.MAX_BATCH + 1)},
         f"transaction.envelopes: more than {protocol.MAX_BATCH}"),
        ({"v": 2, "envelopes": [{}]}, "transaction.v: expected protocol version 1"),
        ({"envelopes": [{}]}, "transaction.v: expected protocol version 1"),
        ([1], "transaction: expected a map"),
    ],
)
def test_decode_transaction_limits(doc: object, field: str) -> None:
    assert violation(protocol.decode_transaction, protocol.pack(doc)).startswith(field)


def test_decode_transaction_accepts_exactly_max_batch() -> None:
    assert len(protocol.decode_transaction(protocol.pack({"v": 1, "envelopes": [{}] * protocol.MAX_BATCH}))) == 500


def test_decode_outcomes_checks_the_count_and_version() -> None:
    body = protocol.encode_outcomes([Outcome(True)])
    assert violation(protocol.decode_outcomes, body, 2).startswith("results: expected an array of 2")
    assert violation(protocol.decode_outcomes, protocol.pack({"v": 0, "results": []}), 0).startswith("results.v")


def test_decode_ack() -> None:
    assert protocol.decode_ack(protocol.pack({"v": 1, "seqs": [1, 2]})) == ([1, 2], [])
    assert protocol.decode_ack(protocol.encode_ack([], [])) == ([], [])


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"v": 1, "seqs": [1, True]}, "ack.seqs"),
        ({"v": 1, "seqs": [1, 2.0]}, "ack.seqs"),
        ({"v": 1, "seqs": "1"}, "ack.seqs"),
        ({"v": 1}, "ack.seqs"),
        ({"v": 1, "seqs": list(range(protocol.MAX_ACK + 1))}, "ack.seqs"),
        ({"v": 1, "seqs": [], "failed": {}}, "ack.failed"),
        ({"v": 1, "seqs": [], "failed": [{"seq": 1, "rcpt": [BOB]}]}, "reason:"),
        ({"v": 2, "seqs": []}, "ack.v"),
    ],
)
def test_decode_ack_refuses(doc: dict, field: str) -> None:
    assert violation(protocol.decode_ack, protocol.pack(doc)).startswith(field)


def test_encode_error() -> None:
    assert protocol.unpack(protocol.encode_error("bad_request", "why"), "error") == {
        "v": 1, "error": "bad_request", "detail": "why"}




# -- msgpack itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(msgpack.packb(msgpack.ExtType(5, b"abc")), id="ext-type"),
        pytest.param(msgpack.packb({"v": 1, "x": msgpack.ExtType(1, b"")}), id="nested-empty-ext"),
        # The timestamp type (-1) bypasses ext_hook in msgpack: it must be refused all the same.
        pytest.param(msgpack.packb(msgpack.Timestamp(1, 0)), id="timestamp32"),
        pytest.param(msgpack.packb({"sent_at": msgpack.Timestamp(1, 5)}), id="timestamp64"),
        pytest.param(msgpack.packb(msgpack.Timestamp(2**40, 0)), id="timestamp96"),
    ],
)
def test_unpack_refuses_extension_types(data: bytes) -> None:
    assert violation(protocol.unpack, data, "body").startswith("body: not a valid msgpack body")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "ValueError"),  # nothing at all
        (protocol.pack({"v": 1, "seqs": [1, 2, 3]})[:-1], "ValueError"),  # truncated
        (b"\xdb\xff\xff\xff\xff", "ValueError"),  # a 4 GiB string announced in 5 bytes
        (protocol.pack({"v": 1}) + b"\x00", "ExtraData"),  # trailing garbage
        (b"\xc1", "FormatError"),  # the one reserved byte
        (b"\x81\x01\x02", "ValueError"),  # integer map key
        (b"\x81\x91\x01\x02", "ValueError"),  # array map key
        (b"\x91" * 5000 + b"\x01", "StackError"),  # nested too deep
        (b"\xa2\xff\xfe", "UnicodeDecodeError"),  # not UTF-8
    ],
)
def test_unpack_refuses_malformed_bodies(data: bytes, kind: str) -> None:
    assert violation(protocol.unpack, data, "ack") == f"ack: not a valid msgpack body ({kind})"


def test_decoders_refuse_garbage_with_protocol_violation() -> None:
    for decode in (protocol.decode_transaction, protocol.decode_ack, lambda d: protocol.decode_outcomes(d, 1)):
        with pytest.raises(ProtocolViolation):
            decode(protocol.encode_outcomes([Outcome(True)]) + b"\xc0")


def test_unpack_decodes_plain_data() -> None:
    doc = {"v": 1, "b": b"\x00\xff", "f": 1.5, "n": None, "l": [True, -3, "é"], "m": {"k": {}}}
    assert protocol.unpack(protocol.pack(doc), "x") == doc


# -- the inbox stream --------------------------------------------------------------------------


def inbox_items() -> list[InboxItem]:
    return [
        InboxItem(1, envelope=envelope(origin="chu-nord.test")),
        InboxItem(2, receipt=Receipt("msg-0001_abcdef", (ALICE,), "delivered")),
        InboxItem(3, envelope=envelope(id="msg-0003_abcdef", body="é" * 1000, origin="chu-nord.test")),
        InboxItem(4, receipt=Receipt("msg-0003_abcdef", (ALICE,), "failed", "unknown_recipient")),
    ]


def test_stream_unpacker_fed_byte_by_byte_yields_every_item() -> None:
    items = inbox_items()
    stream = b"".join(protocol.pack(item.to_wire()) for item in items)
    unpacker = protocol.stream_unpacker()
    got: list[InboxItem] = []
    yielded_at: list[int] = []
    for offset in range(len(stream)):
        unpacker.feed(stream[offset:offset + 1])
        for obj in unpacker:
            got.append(InboxItem.from_wire(obj))
            yielded_at.append(offset + 1)
    assert got == items
    # Each item comes out as soon as its last byte arrived, not later.
    ends, end = [], 0
    for item in items:
        end += len(protocol.pack(item.to_wire()))
        ends.append(end)
    assert yielded_at == ends


def test_stream_unpacker_takes_a_largest_envelope_in_frame_sized_chunks() -> None:
    """A maximal legal envelope (full body, 100 of the longest addresses,
    the longest thread) goes through the stream in 64 KiB DATA frames."""
    domain = ".".join(["d" * 63] * 3 + ["d" * 61])
    to = tuple(f"u{i:03d}{'a' * 60}@{domain}" for i in range(protocol.MAX_RECIPIENTS))
    big = envelope(
        id="i" * 64, sender=to[0], to=to, rcpt=to, body="é" * (protocol.MAX_BODY_BYTES // 2),
        thread="\u20ac" * protocol.MAX_THREAD_CHARS, priority="urgent", origin=domain,
    )
    item = InboxItem(2**40, envelope=big)
    stream = protocol.pack(item.to_wire()) * 3
    for chunk in (64 * 1024, 16 * 1024, 1000):
        unpacker = protocol.stream_unpacker()
        got = []
        for offset in range(0, len(stream), chunk):
            unpacker.feed(stream[offset:offset + chunk])
            got += [InboxItem.from_wire(obj) for obj in unpacker]
        assert got == [item] * 3


def test_stream_unpacker_refuses_extension_types() -> None:
    for data in (msgpack.packb(msgpack.ExtType(3, b"x")), msgpack.packb({"seq": msgpack.Timestamp(1, 0)})):
        unpacker = protocol.stream_unpacker()
        unpacker.feed(data)
        with pytest.raises(ValueError, match=re.compile("ext", re.IGNORECASE)):
            list(unpacker)


def test_stream_unpacker_bounds_its_buffer() -> None:
    unpacker = protocol.stream_unpacker()
    with pytest.raises(msgpack.BufferFull):
        unpacker.feed(b"\xdb" + (protocol.MAX_ITEM_BYTES * 3).to_bytes(4, "big") + b"x" * protocol.MAX_ITEM_BYTES * 2)
