"""The relay's units of work, on a real SQLite file migrated by `store.migrate`.

Most tests call the units directly on a connection (as the writer thread
does, minus the group transaction); the last ones go through a real `Store`.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import trio

from relay.core import protocol
from relay.core.protocol import Envelope, Failure, InboxItem, Outcome, Receipt
from relay.store import relay_inbox, relay_queue
from relay.store.engine import Store, connect, migrate
from relay.store.relay_queue import Submission

STEP = 15.0

HOME = "chu-nord.test"
ALICE = f"alice@{HOME}"
ANNE = f"anne@{HOME}"
BOB = "bob@clinique-sud.test"
CAROL = "carol@clinique-sud.test"
DAVE = "dave@ehpad-est.test"
# The relay's clock in these tests (the units take it as an argument).
NOW = 1_700_000_000.0


def submission(ident: str, *, to=(BOB, CAROL, DAVE), priority="normal", system="messenger",
               idem_key=None, body="Bonjour", thread=None) -> Submission:
    return Submission(ident, HOME, system, idem_key, ALICE, tuple(to), thread, priority, body)


def count(conn: sqlite3.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def statuses(conn: sqlite3.Connection, ident: str) -> dict[str, tuple[str, str | None]]:
    return {
        address: (status, reason)
        for address, status, reason in conn.execute(
            "SELECT address, status, reason FROM recipient WHERE message_id = ?", (ident,)
        )
    }


# -- submit --------------------------------------------------------------------------------


def test_submit_stores_the_message_its_recipients_and_one_outbox_row_per_domain(conn) -> None:
    assert relay_queue.submit(conn, submission("msg-00000001", thread="t-1"), now=NOW) == ("msg-00000001", "queued")

    row = conn.execute(
        "SELECT domain, system, sender, recipients, thread, priority, body FROM message WHERE id = ?",
        ("msg-00000001",),
    ).fetchone()
    assert row[:3] == (HOME, "messenger", ALICE)
    assert protocol.unpack(row[3], "recipients") == [BOB, CAROL, DAVE]
    assert row[4:] == ("t-1", "normal", "Bonjour")
    assert statuses(conn, "msg-00000001") == {BOB: ("queued", None), CAROL: ("queued", None), DAVE: ("queued", None)}
    outbox = conn.execute("SELECT domain, message_id, dest, lane FROM outbox ORDER BY seq").fetchall()
    assert outbox == [
        (HOME, "msg-00000001", "clinique-sud.test", relay_queue.NORMAL),
        (HOME, "msg-00000001", "ehpad-est.test", relay_queue.NORMAL),
    ]


def test_an_urgent_message_goes_to_the_urgent_lane(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB,), priority="urgent"), now=NOW)
    assert conn.execute("SELECT lane FROM outbox").fetchall() == [(relay_queue.URGENT,)]
    assert relay_queue.outbox_depth(conn) == {"urgent": 1, "normal": 0}


def test_an_idempotency_key_returns_the_first_id_and_creates_nothing(conn) -> None:
    assert relay_queue.submit(conn, submission("msg-00000001", idem_key="k-1"), now=NOW) == ("msg-00000001", "queued")
    before = [count(conn, t) for t in ("message", "recipient", "outbox")]
    again = submission("msg-00000002", idem_key="k-1", body="different, on purpose")
    assert relay_queue.submit(conn, again, now=NOW) == ("msg-00000001", "queued")
    assert [count(conn, t) for t in ("message", "recipient", "outbox")] == before
    # A replay tells where the first message is now, and needs no room.
    relay_queue.advance(conn, [("msg-00000001", address) for address in (BOB, CAROL, DAVE)], "sent", now=NOW)
    assert relay_queue.submit(conn, again, lambda priority: False, now=NOW) == ("msg-00000001", "sent")
    # The key belongs to the system: another system's equal key is another message.
    other = submission("msg-00000003", idem_key="k-1", system="lab")
    assert relay_queue.submit(conn, other, now=NOW) == ("msg-00000003", "queued")
    # Without a key, nothing is deduplicated.
    assert relay_queue.submit(conn, submission("msg-00000004"), now=NOW)[0] == "msg-00000004"
    assert relay_queue.submit(conn, submission("msg-00000005"), now=NOW)[0] == "msg-00000005"
    assert count(conn, "message") == 4


def test_a_full_store_refuses_what_has_no_room(conn) -> None:
    rooms = []
    with pytest.raises(relay_queue.StoreFull):
        relay_queue.submit(conn, submission("msg-00000001", priority="normal"), lambda p: rooms.append(p) or False,
                           now=NOW)
    assert rooms == ["normal"] and count(conn, "message") == 0
    urgent = submission("msg-00000002", priority="urgent")
    assert relay_queue.submit(conn, urgent, lambda p: p == "urgent", now=NOW) == ("msg-00000002", "queued")


# -- next_batch and apply_outcomes -----------------------------------------------------------


def test_next_batch_is_urgent_first_then_submission_order(conn) -> None:
    for ident, priority in [("n1-aaaaaaaa", "normal"), ("u1-aaaaaaaa", "urgent"), ("n2-aaaaaaaa", "normal"),
                            ("u2-aaaaaaaa", "urgent")]:
        relay_queue.submit(conn, submission(ident, to=(BOB,), priority=priority), now=NOW)
    batch = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    assert [env.id for _, env in batch] == ["u1-aaaaaaaa", "u2-aaaaaaaa", "n1-aaaaaaaa", "n2-aaaaaaaa"]
    assert [env.priority for _, env in batch] == ["urgent", "urgent", "normal", "normal"]
    # Within a lane, the queue positions grow.
    assert batch[0][0] < batch[1][0] and batch[2][0] < batch[3][0]
    first_three = relay_queue.next_batch(conn, HOME, 3, now=NOW).envelopes
    assert [env.id for _, env in first_three] == [e.id for _, e in batch[:3]]
    # Another domain's outbox is not this one's.
    assert relay_queue.next_batch(conn, "other.test", 10, now=NOW).envelopes == []
    # One lane at a time, past what is already with the hub.
    normal = relay_queue.next_batch(conn, HOME, 10, lane=relay_queue.NORMAL, now=NOW).envelopes
    assert [env.id for _, env in normal] == ["n1-aaaaaaaa", "n2-aaaaaaaa"]
    assert [env.id for _, env in relay_queue.next_batch(conn, HOME, 10, lane=relay_queue.NORMAL,
                                                        after=normal[0][0], now=NOW).envelopes] == ["n2-aaaaaaaa"]
    assert [env.id for _, env in relay_queue.next_batch(conn, HOME, 10, lane=relay_queue.URGENT,
                                                        after=batch[0][0], now=NOW).envelopes] == ["u2-aaaaaaaa"]


def test_next_batch_builds_one_envelope_per_destination_domain(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB, DAVE, CAROL), thread="t", body="x"), now=NOW)
    accepted_at, expires_at = conn.execute("SELECT accepted_at, expires_at FROM message").fetchone()
    assert expires_at == accepted_at + 7 * 86400  # the default time-to-live
    batch = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    envelopes = {env.dest: env for _, env in batch}
    assert set(envelopes) == {"clinique-sud.test", "ehpad-est.test"}
    assert envelopes["clinique-sud.test"] == Envelope(
        "msg-00000001", ALICE, (BOB, DAVE, CAROL), (BOB, CAROL), "x", "t", "normal", accepted_at,
        expires_at=expires_at,
    )
    assert envelopes["ehpad-est.test"].rcpt == (DAVE,)
    # What the uplink sends is a valid v1 envelope.
    for env in envelopes.values():
        assert Envelope.from_wire(protocol.unpack(protocol.pack(env.to_wire()), "envelope")) == env


def test_apply_outcomes_moves_recipients_and_empties_the_outbox(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB, CAROL, DAVE)), now=NOW)
    batch = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    outcomes = {
        "clinique-sud.test": Outcome(True),
        "ehpad-est.test": Outcome(False, protocol.UNKNOWN_DOMAIN, "no relay"),
    }
    relay_queue.apply_outcomes(conn, [(seq, env, outcomes[env.dest]) for seq, env in batch], now=NOW)
    assert count(conn, "outbox") == 0
    assert relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes == []
    assert statuses(conn, "msg-00000001") == {
        BOB: ("sent", None),
        CAROL: ("sent", None),
        DAVE: ("failed", protocol.UNKNOWN_DOMAIN),
    }
    assert relay_queue.outbox_depth(conn) == {"urgent": 0, "normal": 0}


def receipt(seq: int, ident: str, rcpt: tuple[str, ...], status: str, reason: str | None = None) -> InboxItem:
    return InboxItem(seq, receipt=Receipt(ident, rcpt, status, reason))


def no_systems(address: str) -> list[str]:
    return []


def test_statuses_only_move_forward(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB, CAROL)), now=NOW)
    [(seq, env)] = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    # The receipt overtakes the hub's answer (the answer was lost and resent).
    relay_inbox.take_inbound(conn, HOME, [receipt(1, env.id, (BOB,), "delivered")], no_systems, now=NOW)
    relay_inbox.take_inbound(
        conn, HOME, [receipt(2, env.id, (CAROL,), "failed", protocol.UNKNOWN_RECIPIENT)], no_systems, now=NOW
    )
    relay_queue.apply_outcomes(conn, [(seq, env, Outcome(True))], now=NOW)
    assert statuses(conn, env.id) == {BOB: ("delivered", None), CAROL: ("failed", protocol.UNKNOWN_RECIPIENT)}
    # Repeated or contradicting news after a final status changes nothing.
    relay_inbox.take_inbound(
        conn, HOME,
        [receipt(3, env.id, (BOB,), "failed", "late"), receipt(4, env.id, (CAROL,), "delivered"),
         receipt(5, env.id, (BOB,), "delivered")],
        no_systems, now=NOW
    )
    assert statuses(conn, env.id) == {BOB: ("delivered", None), CAROL: ("failed", protocol.UNKNOWN_RECIPIENT)}


def test_a_receipt_moves_queued_and_sent_recipients(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB, CAROL)), now=NOW)
    [(seq, env)] = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    relay_queue.apply_outcomes(conn, [(seq, env, Outcome(True))], now=NOW)
    assert statuses(conn, env.id)[BOB] == ("sent", None)
    relay_inbox.take_inbound(conn, HOME, [receipt(1, env.id, (BOB, CAROL), "delivered")], no_systems, now=NOW)
    assert statuses(conn, env.id) == {BOB: ("delivered", None), CAROL: ("delivered", None)}


@pytest.mark.parametrize(
    ("statuses_", "overall"),
    [
        ([], "queued"),
        (["delivered"], "delivered"),
        (["delivered", "delivered"], "delivered"),
        (["queued", "delivered"], "queued"),
        (["sent", "delivered"], "sent"),
        (["queued", "sent"], "queued"),
        (["failed", "delivered"], "failed"),  # a failure outranks a delivery
        (["sent", "failed"], "sent"),  # the least advanced recipient
        (["failed", "failed"], "failed"),
    ],
)
def test_overall_status(statuses_: list[str], overall: str) -> None:
    assert relay_queue.overall_status(iter(statuses_)) == overall


def test_message_status_only_for_the_sending_system(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB, DAVE)), now=NOW)
    batch = relay_queue.next_batch(conn, HOME, 10, now=NOW).envelopes
    relay_queue.apply_outcomes(conn, [
        (seq, env, Outcome(True) if env.dest == "clinique-sud.test" else Outcome(False, "unknown_domain"))
        for seq, env in batch
    ], now=NOW)
    assert relay_queue.message_status(conn, "msg-00000001", "messenger") == {
        "id": "msg-00000001",
        "status": "sent",
        "recipients": {BOB: {"status": "sent"}, DAVE: {"status": "failed", "reason": "unknown_domain"}},
    }
    assert relay_queue.message_status(conn, "msg-00000001", "lab") is None
    assert relay_queue.message_status(conn, "msg-nothing-such", "messenger") is None


# -- take_inbound and events ------------------------------------------------------------------------

SERVING = {ALICE: ["messenger", "lab"], ANNE: ["messenger"]}


def serving(address: str) -> list[str]:
    return SERVING.get(address, [])


def inbound(seq: int, ident: str = "in-00000001", *, rcpt=(ALICE, ANNE), origin="clinique-sud.test",
            body="Résultats", **fields) -> InboxItem:
    sender = fields.pop("sender", f"bob@{origin}")
    env = Envelope(ident, sender, fields.pop("to", rcpt), rcpt, body, fields.pop("thread", None),
                   fields.pop("priority", "normal"), fields.pop("sent_at", 1_700_000_000.5), origin)
    assert not fields
    return InboxItem(seq, envelope=env)


def test_take_inbound_fans_out_one_event_per_system(conn) -> None:
    failures, woken = relay_inbox.take_inbound(conn, HOME, [inbound(1)], serving, now=NOW)
    assert failures == []
    assert woken == {"messenger", "lab"}
    # messenger serves both recipients but gets the message once.
    assert [(e["cursor"] > 0, e["message"]["id"]) for e in relay_inbox.events(conn, "messenger", 0, 10)] == [
        (True, "in-00000001")]
    assert [e["message"]["id"] for e in relay_inbox.events(conn, "lab", 0, 10)] == ["in-00000001"]
    assert relay_inbox.events(conn, "nobody", 0, 10) == []
    assert count(conn, "inbound") == 1


def test_the_same_message_twice_makes_one_event(conn) -> None:
    relay_inbox.take_inbound(conn, HOME, [inbound(1)], serving, now=NOW)
    # Resent after a lost ack, even at another queue position, and twice in one batch.
    failures, woken = relay_inbox.take_inbound(conn, HOME, [inbound(7), inbound(8)], serving, now=NOW)
    assert (failures, woken) == ([], set())
    assert len(relay_inbox.events(conn, "messenger", 0, 10)) == 1
    assert count(conn, "inbound") == 1 and count(conn, "event") == 2


def test_the_duplicate_filter_is_per_origin(conn) -> None:
    relay_inbox.take_inbound(conn, HOME, [inbound(1, origin="clinique-sud.test")], serving, now=NOW)
    _, woken = relay_inbox.take_inbound(conn, HOME, [inbound(2, origin="ehpad-est.test")], serving, now=NOW)
    assert woken == {"messenger", "lab"}
    page = relay_inbox.events(conn, "messenger", 0, 10)
    assert [e["message"]["origin"] for e in page] == [
        {"domain": "clinique-sud.test", "organisation": None}, {"domain": "ehpad-est.test", "organisation": None}]


def test_unknown_recipients_are_reported_every_time(conn) -> None:
    ghost = f"ghost@{HOME}"
    item = inbound(4, rcpt=(ALICE, ghost))
    expected = [Failure(4, (ghost,), protocol.UNKNOWN_RECIPIENT)]
    assert relay_inbox.take_inbound(conn, HOME, [item], serving, now=NOW) == (expected, {"messenger", "lab"})
    # The duplicate creates nothing but rebuilds the same ack.
    assert relay_inbox.take_inbound(conn, HOME, [item], serving, now=NOW) == (expected, set())
    assert len(relay_inbox.events(conn, "lab", 0, 10)) == 1


def test_a_message_for_nobody_here_is_reported_and_not_stored(conn) -> None:
    ghosts = (f"ghost@{HOME}", f"phantom@{HOME}")
    item = inbound(5, rcpt=ghosts)
    for _ in range(2):
        assert relay_inbox.take_inbound(conn, HOME, [item], serving, now=NOW) == (
            [Failure(5, ghosts, protocol.UNKNOWN_RECIPIENT)], set())
    assert count(conn, "inbound") == 0 and count(conn, "event") == 0


def test_a_misrouted_envelope_is_reported_and_not_stored(conn) -> None:
    item = inbound(6, rcpt=(BOB,), origin="ehpad-est.test")
    assert item.envelope.dest != HOME
    assert relay_inbox.take_inbound(conn, HOME, [item], lambda a: ["messenger"], now=NOW) == (
        [Failure(6, (BOB,), "misrouted")], set())
    assert count(conn, "inbound") == 0 and count(conn, "event") == 0


def test_a_batch_mixes_messages_receipts_and_failures(conn) -> None:
    relay_queue.submit(conn, submission("msg-00000001", to=(BOB,)), now=NOW)
    ghost = f"ghost@{HOME}"
    items = [
        inbound(10, "in-00000001"),
        receipt(11, "msg-00000001", (BOB,), "delivered"),
        inbound(12, "in-00000002", rcpt=(ghost,)),
        inbound(13, "in-00000003", rcpt=(ANNE,)),
    ]
    failures, woken = relay_inbox.take_inbound(conn, HOME, items, serving, now=NOW)
    assert failures == [Failure(12, (ghost,), protocol.UNKNOWN_RECIPIENT)]
    assert woken == {"messenger", "lab"}
    assert statuses(conn, "msg-00000001") == {BOB: ("delivered", None)}
    assert [e["message"]["id"] for e in relay_inbox.events(conn, "messenger", 0, 10)] == [
        "in-00000001", "in-00000003"]


def test_events_page_in_cursor_order(conn) -> None:
    for i in range(1, 8):
        relay_inbox.take_inbound(conn, HOME, [inbound(i, f"in-0000000{i}", rcpt=(ANNE,))], serving, now=NOW)
    every = relay_inbox.events(conn, "messenger", 0, 100)
    cursors = [e["cursor"] for e in every]
    assert cursors == sorted(cursors) and len(set(cursors)) == 7 and cursors[0] > 0
    assert [e["message"]["id"] for e in every] == [f"in-0000000{i}" for i in range(1, 8)]
    # Paging: `after` is the last cursor seen, `limit` the page size.
    pages, after = [], 0
    while page := relay_inbox.events(conn, "messenger", after, 3):
        pages.append([e["message"]["id"] for e in page])
        after = page[-1]["cursor"]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [e for p in pages for e in p] == [e["message"]["id"] for e in every]
    assert relay_inbox.events(conn, "messenger", cursors[-1], 10) == []
    # Another system's events do not consume this system's cursor space.
    assert relay_inbox.events(conn, "lab", 0, 100) == []


def test_an_event_carries_the_message(conn) -> None:
    item = inbound(1, rcpt=(ALICE,), to=(ALICE, BOB), thread="dossier-7", priority="urgent",
                   sent_at=1_700_000_000.25, body="Résultats: normaux")
    relay_inbox.take_inbound(conn, HOME, [item], serving, now=NOW)
    [event] = relay_inbox.events(conn, "lab", 0, 10)
    assert event == {
        "cursor": event["cursor"],
        "type": "message",
        "message": {
            "id": "in-00000001",
            "from": "bob@clinique-sud.test",
            "to": [ALICE, BOB],
            "body": "Résultats: normaux",
            "thread": "dossier-7",
            "priority": "urgent",
            "sent_at": "2023-11-14T22:13:20.250Z",
            "origin": {"domain": "clinique-sud.test", "organisation": None},
        },
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["message"]["sent_at"])


# -- through a real Store ---------------------------------------------------------------------------


async def test_units_through_a_store_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    with trio.fail_after(STEP):
        async with Store.open(path, relay_queue.MIGRATIONS) as store:
            # The same Idempotency-Key twice in one group: one message.
            results = []

            async def submit(ident: str) -> None:
                results.append(await store.run(
                    "submit", lambda c: relay_queue.submit(c, submission(ident, idem_key="same"), now=NOW)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit, "msg-00000001")
                nursery.start_soon(submit, "msg-00000002")
            first = results[0][0]
            assert results == [(first, "queued"), (first, "queued")]
            await store.run("take", lambda c: relay_inbox.take_inbound(c, HOME, [inbound(1)], serving, now=NOW))

        async with Store.open(path, relay_queue.MIGRATIONS) as store:
            batch = await store.run("next_batch", lambda c: relay_queue.next_batch(c, HOME, 10, now=NOW).envelopes)
            page = await store.run("events", lambda c: relay_inbox.events(c, "lab", 0, 10))
    assert sorted(env.dest for _, env in batch) == ["clinique-sud.test", "ehpad-est.test"]
    assert {env.id for _, env in batch} == {first}
    assert [e["message"]["id"] for e in page] == ["in-00000001"]


def test_a_version_1_database_migrates_with_its_data(tmp_path: Path) -> None:
    db = connect(tmp_path / "relay.db")
    migrate(db, relay_queue.MIGRATIONS[:1], "v1")
    db.execute("INSERT INTO message (id, domain, system, sender, recipients, priority, body, accepted_at)"
               " VALUES ('msg-00000001', ?, 'messenger', ?, ?, 'normal', 'old', 1000.0)",
               (HOME, ALICE, protocol.pack([BOB])))
    db.execute("INSERT INTO recipient VALUES ('msg-00000001', ?, 'queued', NULL, 1000.0)", (BOB,))
    db.execute("INSERT INTO outbox (domain, message_id, dest, lane) VALUES (?, 'msg-00000001', ?, 0)",
               (HOME, "clinique-sud.test"))
    db.execute("INSERT INTO inbound (domain, origin, id, sender, recipients, priority, body, sent_at, received_at)"
               " VALUES (?, 'clinique-sud.test', 'in-00000001', ?, ?, 'normal', 'hello', 900.0, 950.0)",
               (HOME, BOB, protocol.pack([ALICE])))
    db.execute("INSERT INTO event (system, inbound) VALUES ('messenger', 1)")
    assert migrate(db, relay_queue.MIGRATIONS, "v2") == len(relay_queue.MIGRATIONS)
    [(_seq, envelope)] = relay_queue.next_batch(db, HOME, 10, now=2000.0).envelopes
    assert (envelope.id, envelope.body, envelope.expires_at) == ("msg-00000001", "old", 1000.0 + 7 * 86400)
    [event] = relay_inbox.events(db, "messenger", 0, 10)
    assert (event["cursor"], event["type"], event["message"]["body"]) == (1, "message", "hello")
    # New events continue after the old cursors.
    db.execute("INSERT INTO event (system, type, created_at) VALUES ('messenger', 'delayed', 0)")
    assert db.execute("SELECT max(cursor) FROM event").fetchone()[0] == 2
    db.close()
