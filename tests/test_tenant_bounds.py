"""What one tenant (a relay, a local system) supplies is bounded where it
enters, so that nothing it sends can reach another tenant, or a shared
resource, unbounded: every item the hub queues from a relay's input can be
decoded by the relay it is for.  The hub's units run on a real SQLite file;
docs/security.md §Tenant-supplied fields lists the bounds tested here."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.appliance.local_api import ApiError, LocalApi
from relay.core import protocol, routes
from relay.core.protocol import Envelope, Failure, InboxItem, Outcome, ProtocolViolation, Receipt
from relay.store import hub_queue
from relay.store.engine import connect, migrate

NORD, SUD = "chu-nord.test", "clinique-sud.test"
ALICE, BOB = f"alice@{NORD}", f"bob@{SUD}"
NOW = 1_700_000_100.0
MIB = 1 << 20


def hub_db(path: Path, *domains: str) -> sqlite3.Connection:
    conn = connect(path)
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset(domains or {NORD, SUD}), learnt=False, now=NOW)
    return conn


def envelope(ident: str = "msg-00000001", **fields) -> Envelope:
    base = dict(id=ident, sender=ALICE, to=(BOB,), rcpt=(BOB,), body="Bonjour", thread=None, priority="normal",
                sent_at=1_700_000_000.0)
    return Envelope(**{**base, **fields})


def inbox(conn: sqlite3.Connection, domain: str) -> list[InboxItem]:
    """Every item queued for ``domain``, framed as the hub sends them and read
    back by the relay's decoder, each frame within the decoder's item bound."""
    rows = hub_queue.fetch_inbox(conn, domain, {hub_queue.URGENT: 0, hub_queue.NORMAL: 0}, 10_000, now=NOW)
    decoder = routes.InboxDecoder()
    items = []
    for seq, _, kind, payload in rows:
        frame = routes.inbox_frame(seq, kind, payload)
        assert len(frame) <= protocol.MAX_ITEM_BYTES, f"item {seq} for {domain}: {len(frame)} bytes"
        items += decoder.feed(frame)
    assert len(items) == len(rows)
    return items


def violation(decode, *args) -> str:
    with pytest.raises(ProtocolViolation) as caught:
        decode(*args)
    return str(caught.value)


# -- the defect: a failure reason from one relay wedged another's inbox ------------------------


def test_a_failure_reason_is_a_short_word_not_a_megabyte(tmp_path: Path) -> None:
    conn = hub_db(tmp_path / "hub.db")
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope().to_wire()], now=NOW)
    [item] = inbox(conn, SUD)
    for size in (MIB, 100_000):  # over the longest string any body may hold; over a reason's bound
        hostile = routes.ack([item.seq], [Failure(item.seq, (BOB,), "x" * size)]).body
        assert violation(protocol.decode_ack, hostile)  # a 400: nothing is queued for NORD
    assert inbox(conn, NORD) == []
    for reason in ("unknown recipient", "Unknown_recipient", "", "r" * 65, "raison_Ã©"):
        assert violation(protocol.decode_ack, routes.ack([item.seq], [Failure(item.seq, (BOB,), reason)]).body)
    seqs, failures = protocol.decode_ack(routes.ack([item.seq], [Failure(item.seq, (BOB,), "r" * 64)]).body)
    hub_queue.apply_ack(conn, SUD, seqs, failures, now=NOW)
    [told] = inbox(conn, NORD)
    assert told.receipt == Receipt("msg-00000001", (BOB,), "failed", "r" * 64)


# -- the invariant, for any input: what the hub queues, the destination decodes ------------------

hostile_text = st.one_of(
    st.text(max_size=80),
    st.builds(lambda n, c: c * n, st.integers(0, 2 * MIB), st.sampled_from(["x", "é", "\n", "\u202e", "\x00"])),
)
hostile_value = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), hostile_text,
    st.lists(st.sampled_from([BOB, ALICE, "mallory@clinique-sud.test", "x"]), max_size=5),
)
ADDRESSES = st.lists(st.sampled_from([BOB, "carol@clinique-sud.test", ALICE]), min_size=1, max_size=3, unique=True)


@st.composite
def hostile_envelope(draw) -> dict:
    wire = envelope(draw(st.sampled_from(["msg-00000001", "msg-00000002"]))).to_wire()
    for name in draw(st.lists(st.sampled_from(sorted(wire) + ["origin", "origin_org", "expires_at"]),
                              max_size=3, unique=True)):
        wire[name] = draw(hostile_value | ADDRESSES)
    return wire


@st.composite
def hostile_failure(draw, seqs: list[int]) -> dict:
    failure = {"seq": draw(st.sampled_from(seqs) | st.integers(-(2**63), 2**64 - 1)),
               "rcpt": draw(ADDRESSES), "reason": draw(hostile_text)}
    if draw(st.booleans()):
        failure[draw(st.sampled_from(["seq", "rcpt", "reason"]))] = draw(hostile_value)
    return failure


@st.composite
def hostile_receipt(draw) -> dict:
    receipt = {"id": "msg-00000001", "rcpt": draw(ADDRESSES), "status": "read", "origin": NORD}
    for name in draw(st.lists(st.sampled_from(["id", "rcpt", "status", "origin", "reason"]), max_size=2)):
        receipt[name] = draw(hostile_value)
    return receipt


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_item_the_hub_queues_from_hostile_input_decodes_at_its_destination(tmp_path: Path, data) -> None:
    """Relay SUD (the tenant under test) answers an honest message from NORD
    with a hostile ack, hostile read receipts and a hostile transaction;
    whatever the hub takes, every inbox still decodes item by item."""
    conn = hub_db(Path(tempfile.mkdtemp(dir=tmp_path)) / "hub.db")
    try:
        hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope().to_wire()], now=NOW)
        seqs = [item.seq for item in inbox(conn, SUD)]
        bodies = [
            (protocol.decode_ack, lambda d: hub_queue.apply_ack(conn, SUD, *d, now=NOW),
             protocol.pack({"v": 1, "seqs": seqs, "failed": data.draw(st.lists(hostile_failure(seqs), max_size=3))})),
            (protocol.decode_receipts, lambda d: hub_queue.accept_receipts(conn, SUD, d, now=NOW),
             protocol.pack({"v": 1, "receipts": data.draw(st.lists(hostile_receipt(), min_size=1, max_size=3))})),
            (protocol.decode_transaction,
             lambda d: hub_queue.accept_transaction(conn, SUD, "txn-00000002", d, now=NOW),
             protocol.pack({"v": 1, "envelopes": data.draw(st.lists(hostile_envelope(), min_size=1, max_size=3))})),
        ]
        for decode, apply, body in bodies:
            try:
                decoded = decode(body)
            except ProtocolViolation:
                continue  # a 400: nothing stored
            apply(decoded)
        inbox(conn, NORD)
        inbox(conn, SUD)
        for (entry,) in conn.execute("SELECT message_id FROM audit WHERE message_id IS NOT NULL"):
            assert protocol.is_token(entry)  # the shared audit trail holds no tenant text
    finally:
        conn.close()


def test_the_largest_items_a_tenant_can_make_fit_the_relays_decoder(tmp_path: Path) -> None:
    """Every field at its limit, in its widest UTF-8: the envelope, the
    `failed` receipt that answers it, and a `read` receipt."""
    label = "a" * 63
    origin = ".".join([label, label, label, "d" * 61])
    dest = ".".join(["e" * 63, "f" * 63, "g" * 63, "h" * 61])
    assert len(origin) == len(dest) == 253
    rcpt = tuple(f"{i:02d}{'x' * 62}@{dest}" for i in range(protocol.MAX_RECIPIENTS))
    widest = "\U0001f600"  # 4 bytes of UTF-8
    big = envelope("m" * 64, sender=f"{'s' * 64}@{origin}", to=rcpt, rcpt=rcpt,
                   body=widest * (protocol.MAX_BODY_BYTES // 4), thread=widest * protocol.MAX_THREAD_CHARS,
                   # sent_at within the replay window, as a float: its widest encoding
                   priority="urgent", sent_at=NOW - 0.001, expires_at=protocol.MAX_SENT_AT - 1,
                   retry_of="r" * 64)
    conn = hub_db(tmp_path / "hub.db", origin, dest)
    outcomes, _ = hub_queue.accept_transaction(conn, origin, "t" * 64, [big.to_wire()],
                                               widest * protocol.MAX_ORG_ID_CHARS, now=NOW)
    assert outcomes == [Outcome(True)]
    [item] = inbox(conn, dest)
    assert item.envelope.origin == origin and item.envelope.body == big.body
    hub_queue.apply_ack(conn, dest, [item.seq], [Failure(item.seq, rcpt, "r" * protocol.MAX_REASON_CHARS)],
                        now=NOW)
    [failed] = inbox(conn, origin)
    assert failed.receipt.rcpt == rcpt and failed.receipt.status == "failed"


def test_an_envelope_over_the_item_bound_is_refused_not_queued(tmp_path: Path, monkeypatch) -> None:
    """Should the field limits ever add up past the decoder's bound, the hub
    refuses the envelope instead of queueing what its destination cannot read."""
    conn = hub_db(tmp_path / "hub.db")
    monkeypatch.setattr(hub_queue, "MAX_PAYLOAD", 1000)
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(body="x" * 1000).to_wire()],
                                                   now=NOW)
    assert outcomes[0].reason == protocol.INVALID_ENVELOPE and woken == set()
    assert inbox(conn, SUD) == []


# -- each field at its entry -------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "error"), [
    ({"thread": "line\nbreak"}, "envelope.thread"),
    ({"thread": "\u202eevil"}, "envelope.thread"),
    ({"thread": "t" * 257}, "envelope.thread"),
    ({"origin": "x" * MIB}, "envelope.origin"),
    ({"origin": "Not A Domain"}, "envelope.origin"),
    ({"origin_org": "1" * 65}, "envelope.origin_org"),
    ({"origin_org": "1234\n"}, "envelope.origin_org"),
])
def test_envelope_text_fields_are_bounded_and_printable(fields: dict, error: str) -> None:
    assert violation(Envelope.from_wire, {**envelope().to_wire(), **fields}).startswith(error)


def test_printable_thread_origin_and_org_pass() -> None:
    wire = {**envelope(thread="Dossier n°42 — suivi 😀").to_wire(), "origin": NORD, "origin_org": "1750000000"}
    assert Envelope.from_wire(wire).thread == "Dossier n°42 — suivi 😀"


@pytest.mark.parametrize(("fields", "error"), [
    ({"reason": "x" * MIB}, "receipt.reason"),
    ({"reason": "no spaces"}, "receipt.reason"),
    ({"origin": "x" * MIB}, "receipt.origin"),
    ({"origin": 7}, "receipt.origin"),
])
def test_receipt_text_fields_are_bounded(fields: dict, error: str) -> None:
    wire = {"id": "msg-00000001", "rcpt": [BOB], "status": "read", "origin": NORD, **fields}
    assert violation(Receipt.from_wire, wire).startswith(error)


@pytest.mark.parametrize("seq", [0, -1, 2**63, 2**64 - 1])
def test_queue_positions_are_sqlite_keys(seq: int) -> None:
    assert violation(protocol.decode_ack, protocol.pack({"v": 1, "seqs": [seq]})).startswith("ack.seqs")
    failed = {"v": 1, "seqs": [], "failed": [{"seq": seq, "rcpt": [BOB], "reason": "x"}]}
    assert violation(protocol.decode_ack, protocol.pack(failed)).startswith("seq:")
    assert violation(InboxItem.from_wire, {"seq": seq, "kind": "receipt",
                                           "receipt": {"id": "msg-00000001", "rcpt": [BOB], "status": "read"}})


def test_the_largest_position_is_acked_without_an_error(tmp_path: Path) -> None:
    conn = hub_db(tmp_path / "hub.db")
    seqs, failures = protocol.decode_ack(protocol.pack({"v": 1, "seqs": [protocol.MAX_SEQ]}))
    assert hub_queue.apply_ack(conn, SUD, seqs, failures, now=NOW) == set()


@pytest.mark.parametrize(("result", "error"), [
    ({"ok": False, "reason": "x" * MIB, "detail": ""}, "reason:"),
    ({"ok": False, "reason": "invalid_envelope", "detail": "d" * (protocol.MAX_DETAIL_CHARS + 1)}, "result.detail"),
])
def test_results_are_bounded(result: dict, error: str) -> None:
    assert violation(Outcome.from_wire, result).startswith(error)


def test_the_hub_never_writes_a_detail_over_the_bound() -> None:
    wire = Outcome(False, protocol.INVALID_ENVELOPE, "d" * MIB).to_wire()
    assert Outcome.from_wire(wire).detail == "d" * protocol.MAX_DETAIL_CHARS


@pytest.mark.parametrize("shape", [
    {"v": 1, "envelopes": [[0] * protocol.MAX_ARRAY] * 120},  # 1.2 million entries of one byte each
    {"v": 1, "envelopes": [[]] * 5 + [[0] * (protocol.MAX_ARRAY + 1)]},
    {"v": 1, "envelopes": [{str(i): 0 for i in range(protocol.MAX_MAP + 1)}]},
])
def test_a_body_cannot_decode_into_millions_of_objects(shape: dict) -> None:
    """A 32 MiB body of one-byte values would be tens of millions of Python
    objects in the hub that every relay shares: refused while decoding."""
    assert "not a valid msgpack body" in violation(protocol.decode_transaction, protocol.pack(shape))


# -- the local side: what a local system submits, the hub takes ----------------------------------


@settings(max_examples=200, deadline=None)
@given(thread=st.none() | st.text(max_size=300))
def test_a_thread_the_local_api_takes_is_one_the_hub_takes(api: LocalApi, thread: str | None) -> None:
    system = api.config.local_systems[0]
    document = {"from": min(system.users) if system.users else f"alice@{api.config.domain}",
                "to": [BOB], "body": "Bonjour", "thread": thread}
    if not protocol.is_thread(thread) and thread is not None:
        with pytest.raises(ApiError, match=r"^thread:"):
            api._validate(system, document, None)
        return
    submission = api._validate(system, document, None)
    Envelope.from_wire(envelope(thread=submission.thread).to_wire())


@pytest.mark.parametrize("thread", ["line\nbreak", "tab\there", "zero\u200bwidth", "\u202eevil", "t" * 257])
def test_the_local_api_refuses_a_thread_other_hospitals_should_not_see(api: LocalApi, thread: str) -> None:
    system = api.config.local_systems[0]
    document = {"from": min(system.users) if system.users else f"alice@{api.config.domain}",
                "to": [BOB], "body": "Bonjour", "thread": thread}
    with pytest.raises(ApiError, match=r"^thread: expected at most 256 printable characters"):
        api._validate(system, document, None)
