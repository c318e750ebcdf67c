"""Property tests of every decoder that reads what a peer sent: whatever
the bytes, the answer is the value or a ProtocolViolation / 4xx, never a
crash, and never a hang (hypothesis runs each example under its deadline)."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.appliance.local_api import ApiError, LocalApi, _json_body
from relay.core import protocol
from relay.core.protocol import Envelope, InboxItem, ProtocolViolation
from relay.net.local_server import Request

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)
FIELDS = ["id", "from", "to", "rcpt", "body", "thread", "priority", "sent_at", "origin", "expires_at", "origin_org",
          "seq", "kind", "envelope", "receipt", "status", "reason", "v", "envelopes", "seqs", "failed", "results", "ok"]
# Maps that look like protocol messages, with random values: they reach the field checks.
lookalike = st.recursive(
    plain, lambda inner: st.dictionaries(st.sampled_from(FIELDS), inner, max_size=10), max_leaves=40)


def _only_violations(decode, data) -> None:
    try:
        decode(data)
    except ProtocolViolation:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_body_decoders(data: bytes) -> None:
    for decode in (protocol.decode_transaction, protocol.decode_ack, protocol.decode_receipts,
                   lambda d: protocol.decode_outcomes(d, 1), lambda d: protocol.unpack(d, "body")):
        _only_violations(decode, data)


@settings(max_examples=200, deadline=None)
@given(lookalike)
def test_lookalike_messages_are_validated_field_by_field(obj) -> None:
    for decode in (Envelope.from_wire, InboxItem.from_wire, protocol.Receipt.from_wire):
        _only_violations(decode, obj)
    data = msgpack.packb({"v": 1, "envelopes": [obj], "seqs": [obj], "failed": [obj], "receipts": [obj]},
                         use_bin_type=True)
    _only_violations(protocol.decode_transaction, data)
    _only_violations(protocol.decode_ack, data)


def test_hostile_msgpack_shapes_are_refused() -> None:
    huge_declared = b"\xdb\xff\xff\xff\xff" + b"x" * 10  # a str claiming 4 GiB
    deep = b"\x91" * 100_000 + b"\xc0"  # arrays nested 100,000 deep
    timestamp = msgpack.packb(msgpack.Timestamp(1, 0))
    extension = msgpack.packb(msgpack.ExtType(5, b"boom"))
    for data in (huge_declared, deep, timestamp, extension, b"\x82\xa1v\x01", b""):
        with pytest.raises(ProtocolViolation):
            protocol.decode_transaction(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_the_inbox_stream_decoder_refuses_or_yields_items(data: bytes) -> None:
    unpacker = protocol.stream_unpacker()
    try:
        unpacker.feed(data)
        for obj in unpacker:
            _only_violations(InboxItem.from_wire, obj)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.BufferFull):
        pass  # the uplink turns these into a ProtocolViolation and reconnects


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
submission_like = st.fixed_dictionaries(
    {}, optional={"from": json_values | st.just("alice@chu-nord.test"), "to": json_values,
                  "body": json_values, "thread": json_values, "priority": json_values, "extra": json_values})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), submission_like.map(lambda d: json.dumps(d).encode())))
def test_submissions_are_accepted_or_refused_with_a_4xx(api: LocalApi, body: bytes) -> None:
    request = Request("POST", "/v1/messages", {}, {"content-type": "application/json"}, body)
    system = api.config.local_systems[0]
    try:
        api._validate(system, _json_body(request), None)
    except ApiError as exc:
        assert 400 <= exc.status < 500  # noqa: PT017 -- accepted or refused: both are outcomes
