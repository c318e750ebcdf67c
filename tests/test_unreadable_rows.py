"""A row that cannot be read (a damaged body, a key ring without the key)
is one message's problem, never the daemon's: every place that opens a
sealed value or decodes a stored row handles it for that row alone.

Real SQLite files, real key rings, rows damaged in the file; time as data."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from relay.cli.ops import check_backup
from relay.core import protocol
from relay.core.priority import NORMAL, URGENT
from relay.core.protocol import Envelope, InboxItem
from relay.store import hub_queue, relay_admin, relay_inbox, relay_queue, sealing
from relay.store.engine import backup, connect, migrate
from relay.store.relay_queue import Submission

HOME = "chu-nord.test"
ALICE, BOB, CAROL = f"alice@{HOME}", "bob@clinique-sud.test", "carol@clinique-sud.test"
NOW = 1_700_000_000.0
RING = sealing.KeyRing({1: bytes(32)}, 1)
OTHER_RING = sealing.KeyRing({2: bytes([7]) * 32}, 2)


def open_relay(path: Path, ring: sealing.KeyRing | None = RING) -> sqlite3.Connection:
    conn = connect(path, ring)
    migrate(conn, relay_queue.MIGRATIONS, "relay")
    return conn


def submit(conn: sqlite3.Connection, ident: str, to=(BOB,), priority="normal", body="Bonjour") -> None:
    relay_queue.submit(conn, Submission(ident, HOME, "messenger", None, ALICE, tuple(to), None, priority, body),
                       now=NOW)


def damage(conn: sqlite3.Connection, table: str, column: str, where: str, args: tuple) -> None:
    """Flip the last bit of a stored value, as a bad sector or a careless edit would."""
    # The names are the test's own constants, never input: S608 does not apply.
    [(value,)] = conn.execute(f"SELECT {column} FROM {table} WHERE {where}", args)  # noqa: S608
    value = bytes(value) if isinstance(value, bytes) else value.encode()
    conn.execute(f"UPDATE {table} SET {column} = ? WHERE {where}",  # noqa: S608
                 (value[:-1] + bytes([value[-1] ^ 1]), *args))


def statuses(conn: sqlite3.Connection, ident: str) -> dict[str, tuple[str, str | None]]:
    return {a: (s, r) for a, s, r in conn.execute(
        "SELECT address, status, reason FROM recipient WHERE message_id = ?", (ident,))}


# -- the relay's outbox -------------------------------------------------------------------


def test_a_damaged_body_is_failed_with_a_notice_and_a_trace_and_the_lane_goes_on(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    for ident in ("msg-00000001", "msg-00000002", "msg-00000003"):
        submit(conn, ident)
    damage(conn, "message", "body", "id = ?", ("msg-00000002",))

    found = relay_queue.next_batch(conn, HOME, 10, now=NOW)
    assert [env.id for _, env in found.envelopes] == ["msg-00000001", "msg-00000003"]
    assert [(d.message_id, d.dest) for d in found.damaged] == [("msg-00000002", "clinique-sud.test")]
    assert "authentication failed" in found.damaged[0].why

    assert relay_queue.fail_damaged(conn, found.damaged, now=NOW + 1) == {"messenger"}
    assert statuses(conn, "msg-00000002") == {BOB: ("failed", relay_queue.UNREADABLE)}
    [(notice,)] = conn.execute("SELECT notice FROM event WHERE type = 'failed'")
    assert json.loads(notice) == {"id": "msg-00000002", "recipients": {BOB: relay_queue.UNREADABLE}}
    assert conn.execute("SELECT actor, action, message_id, peer FROM audit WHERE action = 'unreadable'").fetchall() \
        == [("relay", "unreadable", "msg-00000002", "clinique-sud.test")]
    assert [d for (d,) in conn.execute("SELECT message_id FROM outbox ORDER BY seq")] == \
        ["msg-00000001", "msg-00000003"]
    assert relay_queue.next_batch(conn, HOME, 10, now=NOW + 1).damaged == []
    # Done twice (two reads raced), the second does nothing.
    assert relay_queue.fail_damaged(conn, found.damaged, now=NOW + 2) == set()
    # Damaged recipients (not the body) are caught the same way.
    submit(conn, "msg-00000004", priority="urgent")
    conn.execute("UPDATE message SET recipients = x'c1' WHERE id = 'msg-00000004'")
    assert [d.message_id for d in relay_queue.next_batch(conn, HOME, 10, now=NOW).damaged] == ["msg-00000004"]
    conn.close()


def test_a_key_ring_without_the_key_fails_the_messages_instead_of_crashing(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    submit(conn, "msg-00000001")
    submit(conn, "msg-00000002", priority="urgent")
    conn.close()
    conn = open_relay(tmp_path / "relay.db", OTHER_RING)
    found = relay_queue.next_batch(conn, HOME, 10, now=NOW)
    assert found.envelopes == []
    assert {d.message_id for d in found.damaged} == {"msg-00000001", "msg-00000002"}
    assert all("key 1, which this key ring has not got" in d.why for d in found.damaged)
    # ... and with no key ring at all.
    conn.close()
    conn = open_relay(tmp_path / "relay.db", None)
    assert all("no key ring" in d.why for d in relay_queue.next_batch(conn, HOME, 10, now=NOW).damaged)
    conn.close()


def test_queue_show_and_retry_of_a_message_whose_body_does_not_open(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    submit(conn, "msg-00000001")
    damage(conn, "message", "body", "id = ?", ("msg-00000001",))
    shown = relay_admin.queue_message(conn, "msg-00000001", True)
    assert (shown["body_kept"], shown["body_unreadable"], shown["body"]) == (True, True, None)
    relay_queue.fail_damaged(conn, relay_queue.next_batch(conn, HOME, 10, now=NOW).damaged, now=NOW)
    assert "cannot be opened" in relay_admin.retry_failed(conn, None, 3600, NOW)["msg-00000001"]
    conn.close()


def test_expiry_does_not_stop_at_a_damaged_row(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    submit(conn, "msg-00000001")
    submit(conn, "msg-00000002")
    conn.execute("UPDATE message SET recipients = x'c1' WHERE id = 'msg-00000001'")
    notified: set[str] = set()
    assert relay_queue.expire(conn, NOW + 8 * 86400, notified) == 2
    assert statuses(conn, "msg-00000001") == {BOB: ("failed", protocol.EXPIRED)}
    conn.close()


def test_a_damaged_read_receipt_does_not_block_those_behind_it(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    conn.executemany("INSERT INTO receipt_out (domain, origin, id, rcpt, status) VALUES (?, ?, ?, ?, 'read')",
                     [(HOME, "clinique-sud.test", "msg-00000001", b"\xc1"),
                      (HOME, "clinique-sud.test", "msg-00000002", protocol.pack([ALICE]))])
    assert [r.rcpt for _, r in relay_queue.next_receipts(conn, HOME, 10)] == [(), (ALICE,)]
    conn.close()


# -- the relay's inbound side -------------------------------------------------------------


def inbound(ident: str, body: str = "Bonjour", **fields) -> InboxItem:
    env = Envelope(ident, BOB, (ALICE,), (ALICE,), body, None, "normal", NOW, origin="clinique-sud.test", **fields)
    return InboxItem(1, env, None)


def test_a_received_body_that_does_not_open_is_an_unreadable_event_not_a_stuck_feed(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    relay_inbox.take_inbound(conn, HOME, [inbound("msg-00000001"), inbound("msg-00000002")],
                             lambda a: ["messenger"], now=NOW)
    damage(conn, "inbound", "body", "id = ?", ("msg-00000001",))
    page = relay_inbox.events(conn, "messenger", 0, 10)
    assert [e["type"] for e in page] == [relay_inbox.UNREADABLE_EVENT, "message"]
    assert page[0]["notice"]["id"] == "msg-00000001" and "body" not in json.dumps(page[0])
    assert page[1]["message"]["body"] == "Bonjour"
    conn.close()


# -- the hub's queue -----------------------------------------------------------------------


def open_hub(path: Path, ring: sealing.KeyRing | None = RING) -> sqlite3.Connection:
    conn = connect(path, ring)
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset({HOME, "clinique-sud.test"}), learnt=False, now=NOW)
    return conn


def hub_envelope(ident: str) -> dict:
    return Envelope(ident, ALICE, (BOB,), (BOB,), "Bonjour", None, "normal", NOW, expires_at=NOW + 60).to_wire()


def test_the_hub_expires_and_acknowledges_past_a_damaged_item(tmp_path: Path) -> None:
    conn = open_hub(tmp_path / "hub.db")
    hub_queue.accept_transaction(conn, HOME, "txn-00000001", [hub_envelope("msg-00000001"),
                                                              hub_envelope("msg-00000002")], now=NOW)
    first, _second = [seq for (seq,) in conn.execute("SELECT seq FROM queue ORDER BY seq")]
    damage(conn, "queue", "payload", "seq = ?", (first,))
    assert hub_queue.expire(conn, NOW + 3600) == {HOME: 1}
    receipts = [protocol.unpack(p, "r") for (p,) in conn.execute("SELECT payload FROM queue WHERE kind = 'receipt'")]
    assert [(r["id"], r["status"]) for r in receipts] == [("msg-00000002", "failed")]
    assert conn.execute("SELECT count(*) FROM audit WHERE action = 'dropped'").fetchone() == (1,)
    # An ack covering a damaged item takes it, and still answers for the others.
    hub_queue.accept_transaction(conn, HOME, "txn-00000002", [hub_envelope("msg-00000003"),
                                                              hub_envelope("msg-00000004")], now=NOW)
    third, fourth = [seq for (seq,) in conn.execute("SELECT seq FROM queue WHERE kind = 'message' ORDER BY seq")]
    conn.execute("UPDATE queue SET payload = ? WHERE seq = ?", (RING.seal(b"\xc1", "clinique-sud.test"), third))
    assert hub_queue.apply_ack(conn, "clinique-sud.test", [third, fourth], [], now=NOW) == {HOME}
    assert conn.execute("SELECT count(*) FROM queue WHERE kind = 'message'").fetchone() == (0,)
    conn.close()


def test_the_hub_fetches_items_of_a_key_it_has_not_got_as_unreadable(tmp_path: Path) -> None:
    conn = open_hub(tmp_path / "hub.db")
    hub_queue.accept_transaction(conn, HOME, "txn-00000001", [hub_envelope("msg-00000001")], now=NOW)
    conn.close()
    conn = open_hub(tmp_path / "hub.db", OTHER_RING)
    [(_, _, _, payload)] = hub_queue.fetch_inbox(conn, "clinique-sud.test", {URGENT: 0, NORMAL: 0}, 10, now=NOW)
    assert payload is None
    conn.close()


# -- backups --------------------------------------------------------------------------------


def test_restore_check_refuses_a_backup_whose_bodies_do_not_open_with_the_key_ring_here(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    submit(conn, "msg-00000001")
    conn.close()
    backup(tmp_path / "relay.db", tmp_path / "copy.db")
    assert check_backup(tmp_path / "copy.db", RING) is None
    assert "do not open with the key ring" in check_backup(tmp_path / "copy.db", OTHER_RING)
    assert "no key ring here" in check_backup(tmp_path / "copy.db", None)


def test_unseal_has_no_sql_function_that_could_hand_back_null(tmp_path: Path) -> None:
    conn = open_relay(tmp_path / "relay.db")
    with pytest.raises(sqlite3.OperationalError, match="no such function: unseal"):
        conn.execute("SELECT unseal(body, id) FROM message")
    conn.close()


def test_the_hub_goes_past_a_damaged_receipt_and_a_damaged_transaction_answer(tmp_path: Path) -> None:
    conn = open_hub(tmp_path / "hub.db")
    hub_queue.accept_transaction(conn, HOME, "txn-00000001", [hub_envelope("msg-00000001")], now=NOW)
    [(seq,)] = conn.execute("SELECT seq FROM queue")
    hub_queue.apply_ack(conn, "clinique-sud.test", [seq], [], now=NOW)  # a delivered receipt for chu-nord
    conn.execute("UPDATE queue SET payload = x'c1' WHERE kind = 'receipt'")
    [(_, _, kind, payload)] = hub_queue.fetch_inbox(conn, HOME, {URGENT: 0, NORMAL: 0}, 10, now=NOW)
    assert (kind, payload) == ("receipt", None)  # for drop_unreadable, not for the relay's decoder
    conn.execute("UPDATE txn SET results = x'c1'")
    [outcome], _ = hub_queue.accept_transaction(conn, HOME, "txn-00000001", [hub_envelope("msg-00000001")], now=NOW)
    assert outcome.accepted
    conn.close()
