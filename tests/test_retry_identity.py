"""`queue retry` sends a message again under a new envelope id, so that the
hub's duplicate filter does not drop it, while the sender's local system
sees one message id and its statuses, and a destination that already has
the message does not show it twice.  Store units on real SQLite files,
time as data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.core import protocol
from relay.core.protocol import Envelope, InboxItem, Outcome, Receipt
from relay.store import hub_queue, relay_admin, relay_inbox, relay_queue
from relay.store.engine import connect, migrate
from relay.store.relay_queue import Submission

HOME, SUD = "chu-nord.test", "clinique-sud.test"
ALICE, BOB, CAROL = f"alice@{HOME}", f"bob@{SUD}", f"carol@{SUD}"
NOW = 1_700_000_000.0
IDENT = "0123456789abcdef0123456789abcdef"  # the shape of protocol.new_message_id


def relay_db(path: Path) -> sqlite3.Connection:
    conn = connect(path)
    migrate(conn, relay_queue.MIGRATIONS, "relay")
    return conn


def status(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT address, status FROM recipient WHERE message_id = ?", (IDENT,)))


def receipt(conn: sqlite3.Connection, ident: str, rcpt: tuple[str, ...], state: str, now: float) -> None:
    item = InboxItem(1, None, Receipt(ident, rcpt, state, protocol.EXPIRED if state == "failed" else None))
    relay_inbox.take_inbound(conn, HOME, [item], lambda a: [], now=now)


def test_a_message_the_hub_failed_after_taking_it_is_retried_under_a_new_envelope_id(tmp_path: Path) -> None:
    conn = relay_db(tmp_path / "relay.db")
    relay_queue.submit(conn, Submission(IDENT, HOME, "messenger", None, ALICE, (BOB, CAROL), None, "normal", "Bonjour"),
                       now=NOW)
    [(seq, first)] = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    assert (first.id, first.retry_of) == (IDENT, "")
    relay_queue.apply_outcomes(conn, [(seq, first, Outcome(True))], now=NOW + 1)
    receipt(conn, IDENT, (BOB,), "delivered", NOW + 2)
    receipt(conn, IDENT, (CAROL,), "failed", NOW + 3)  # say the hub's time-to-live ran out for her
    assert status(conn) == {BOB: "delivered", CAROL: "failed"}

    # Every envelope has left, and the body is kept for the retry window.
    assert relay_queue.drop_bodies(conn, NOW + 3 + 600, 600) == 0
    assert relay_admin.retry_failed(conn, [IDENT], 3600, NOW + 10) == {IDENT: relay_admin.RETRIED}
    [(seq, again)] = relay_queue.next_batch(conn, HOME, 10, now=NOW + 10).envelopes
    assert (again.id, again.retry_of, again.rcpt) == (f"{IDENT}-r1", IDENT, (CAROL,))  # not Bob again
    relay_queue.apply_outcomes(conn, [(seq, again, Outcome(True))], now=NOW + 11)
    assert status(conn) == {BOB: "delivered", CAROL: "sent"}
    receipt(conn, again.id, (CAROL,), "delivered", NOW + 12)
    assert relay_queue.message_status(conn, IDENT, "messenger")["status"] == "delivered"
    assert relay_queue.delivery_facts(conn, [again.id]) == {again.id: ("normal", NOW)}
    assert relay_queue.drop_bodies(conn, NOW + 13, 600) == 1  # delivered to all: nothing to keep it for
    # A second retry is a second attempt.
    receipt(conn, again.id, (CAROL,), "failed", NOW + 14)  # (a late failure cannot undo a delivery)
    assert status(conn)[CAROL] == "delivered"
    conn.close()


def test_the_hub_takes_a_retry_it_would_drop_as_a_duplicate_under_the_old_id(tmp_path: Path) -> None:
    conn = connect(tmp_path / "hub.db")
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset({HOME, SUD}), learnt=False, now=NOW)

    def envelope(ident: str, retry_of: str = "") -> dict:
        return Envelope(ident, ALICE, (CAROL,), (CAROL,), "Bonjour", None, "normal", NOW, retry_of=retry_of).to_wire()

    hub_queue.accept_transaction(conn, HOME, "txn-00000001", [envelope(IDENT)], now=NOW)
    conn.execute("DELETE FROM queue")  # it expired there, say
    _, woken = hub_queue.accept_transaction(conn, HOME, "txn-00000002", [envelope(IDENT)], now=NOW)
    assert woken == set()  # the old code's retry: "ok", and nothing queued
    _, woken = hub_queue.accept_transaction(conn, HOME, "txn-00000003", [envelope(f"{IDENT}-r1", IDENT)], now=NOW)
    assert woken == {SUD}
    [(payload,)] = conn.execute("SELECT payload FROM queue")
    assert Envelope.from_wire(protocol.unpack(payload, "p")).retry_of == IDENT
    conn.close()


def test_a_destination_that_has_the_message_shows_a_retry_of_it_no_second_time(tmp_path: Path) -> None:
    conn = relay_db(tmp_path / "relay.db")
    serves = {BOB: ["lab"], CAROL: ["ward"]}

    def arrive(ident: str, rcpt: tuple[str, ...], retry_of: str = "", known=serves) -> set[str]:
        env = Envelope(ident, ALICE, (BOB, CAROL), rcpt, "Bonjour", None, "normal", NOW, origin=HOME,
                       retry_of=retry_of)
        return relay_inbox.take_inbound(conn, SUD, [InboxItem(1, env, None)], lambda a: known.get(a, []),
                                        now=NOW)[1]

    # Carol was unknown here the first time; she is served now, and the retry goes to her only.
    assert arrive(IDENT, (BOB, CAROL), known={BOB: ["lab"]}) == {"lab"}
    assert arrive(f"{IDENT}-r1", (CAROL,), IDENT) == {"ward"}
    # The hub failed a delivery it could not confirm; the retry finds the message here: no second copy.
    assert arrive(f"{IDENT}-r2", (BOB, CAROL), IDENT) == set()
    pages = {s: relay_inbox.events(conn, s, 0, 10) for s in ("lab", "ward")}
    assert [[e["message"]["id"] for e in page] for page in pages.values()] == [[IDENT], [IDENT]]
    # A read receipt names the envelope the hub knows as delivered here.
    assert relay_inbox.mark_read(conn, SUD, "lab", IDENT, lambda a: a == BOB, now=NOW) is True
    [(_, sent)] = relay_queue.next_receipts(conn, SUD, 10)
    assert (sent.id, sent.origin) == (IDENT, HOME)
    conn.close()


def test_a_resend_of_a_delivered_envelope_gets_its_receipt_again(tmp_path: Path) -> None:
    """A relay restored from a backup older than a delivery sends the
    message again; the hub drops the copy, and says again that it was
    delivered (that relay's store lost the receipt), or it stays "sent"."""
    conn = connect(tmp_path / "hub.db")
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset({HOME, SUD}), learnt=False, now=NOW)
    wire = Envelope(IDENT, ALICE, (CAROL,), (CAROL,), "Bonjour", None, "normal", NOW).to_wire()
    hub_queue.accept_transaction(conn, HOME, "txn-00000001", [wire], now=NOW)
    [(seq,)] = conn.execute("SELECT seq FROM queue")
    hub_queue.apply_ack(conn, SUD, [seq], [], now=NOW)
    conn.execute("DELETE FROM queue")  # the receipt went to the relay's old store
    [outcome], woken = hub_queue.accept_transaction(conn, HOME, "txn-00000002", [wire], now=NOW)
    assert outcome.accepted and woken == {HOME}
    [(domain, kind, payload)] = conn.execute("SELECT domain, kind, payload FROM queue")
    assert (domain, kind) == (HOME, "receipt")
    assert Receipt.from_wire(protocol.unpack(payload, "r")) == Receipt(IDENT, (CAROL,), "delivered")
    conn.close()
