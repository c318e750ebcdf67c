"""The hub's units of work, on a real SQLite file migrated by `store.migrate`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from relay.core import protocol
from relay.core.protocol import Envelope, Failure, Outcome, Receipt
from relay.store import hub_queue, sealing
from relay.store.engine import Store, connect, migrate
from relay.store.hub_queue import NORMAL, URGENT

STEP = 15.0

NORD, SUD, EST = "chu-nord.test", "clinique-sud.test", "ehpad-est.test"
ALICE = f"alice@{NORD}"
BOB, CAROL = f"bob@{SUD}", f"carol@{SUD}"
DAVE = f"dave@{EST}"
# The hub's clock in these tests: a little after the envelopes were sent.
NOW = 1_700_000_100.0


@pytest.fixture
def conn(tmp_path: Path):
    conn = connect(tmp_path / "hub.db")
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset({NORD, SUD, EST}), learnt=False, now=NOW)
    yield conn
    conn.close()


def envelope(ident: str = "msg-00000001", *, sender: str = ALICE, rcpt=(BOB, CAROL), to=None,
             priority: str = "normal", **wire) -> dict:
    """An envelope as the sending relay puts it on the wire."""
    env = Envelope(ident, sender, tuple(to or rcpt), tuple(rcpt), "Bonjour", None, priority, 1_700_000_000.0)
    return {**env.to_wire(), **wire}


def queue(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute("SELECT seq, domain, lane, kind, origin FROM queue ORDER BY seq").fetchall()


def payload(conn: sqlite3.Connection, seq: int) -> dict:
    return protocol.unpack(conn.execute("SELECT payload FROM queue WHERE seq = ?", (seq,)).fetchone()[0], "payload")


# -- accept_transaction ----------------------------------------------------------------------


def test_an_envelope_is_accepted_stamped_and_queued_for_its_destination(conn) -> None:
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(priority="urgent")], now=NOW)
    assert outcomes == [Outcome(True)]
    assert woken == {SUD}
    [(seq, domain, lane, kind, origin)] = queue(conn)
    assert (domain, lane, kind, origin) == (SUD, URGENT, "message", NORD)
    stored = Envelope.from_wire(payload(conn, seq))
    assert stored == Envelope.from_wire(envelope(priority="urgent", origin=NORD))
    assert stored.origin == NORD


def test_the_origin_is_the_connections_domain_whatever_the_relay_wrote(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(origin=EST)], now=NOW)
    [(seq, *_)] = queue(conn)
    assert payload(conn, seq)["origin"] == NORD


def test_bad_envelopes_are_refused_without_refusing_their_neighbours(conn) -> None:
    raw = [
        envelope("msg-00000001"),
        envelope("msg-00000002", sender=f"mallory@{EST}"),
        envelope("msg-00000003", rcpt=("zed@nowhere.test",)),
        {**envelope("msg-00000004"), "priority": "whenever"},
        "not even a map",
        envelope("msg-00000006", rcpt=(DAVE,), priority="urgent"),
    ]
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000001", raw, now=NOW)
    assert [(o.accepted, o.reason) for o in outcomes] == [
        (True, None),
        (False, protocol.SENDER_NOT_AUTHENTICATED),
        (False, protocol.UNKNOWN_DOMAIN),
        (False, protocol.INVALID_ENVELOPE),
        (False, protocol.INVALID_ENVELOPE),
        (True, None),
    ]
    assert "nowhere.test" in outcomes[2].detail
    assert outcomes[3].detail.startswith("envelope.priority")
    assert outcomes[4].detail == "envelope: expected a map"
    assert woken == {SUD, EST}
    assert [(d, lane) for _, d, lane, _, _ in queue(conn)] == [(SUD, NORMAL), (EST, URGENT)]
    assert [payload(conn, seq)["id"] for seq, *_ in queue(conn)] == ["msg-00000001", "msg-00000006"]
    # The answers survive the wire.
    assert protocol.decode_outcomes(protocol.encode_outcomes(outcomes), len(raw)) == outcomes


def test_a_learnt_domain_is_a_known_destination(conn) -> None:
    new = "maternite-ouest.test"
    refused, _ = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(rcpt=(f"x@{new}",))], now=NOW)
    assert refused[0].reason == protocol.UNKNOWN_DOMAIN
    hub_queue.register_domains(conn, frozenset({new}), learnt=True, now=NOW)
    assert new in hub_queue.known_domains(conn)
    accepted, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope(rcpt=(f"x@{new}",))], now=NOW)
    assert accepted == [Outcome(True)] and woken == {new}


def test_a_replayed_transaction_gets_the_same_answers_and_queues_nothing(conn) -> None:
    raw = [envelope("msg-00000001"), envelope("msg-00000002", sender=f"eve@{SUD}"), envelope("msg-00000003")]
    first, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000001", raw, now=NOW)
    assert woken == {SUD}
    before = queue(conn)
    assert len(before) == 2
    again, woken_again = hub_queue.accept_transaction(conn, NORD, "txn-00000001", raw, now=NOW)
    assert again == first
    assert woken_again == set()
    assert queue(conn) == before
    # Even when the domain list changed meanwhile, the stored answer stands.
    hub_queue.register_domains(conn, frozenset({"late.test"}), learnt=True, now=NOW)
    replayed = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(rcpt=("x@late.test",))], now=NOW)
    assert replayed[0] == first
    assert queue(conn) == before


def test_transaction_ids_are_per_origin(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW)
    outcomes, woken = hub_queue.accept_transaction(
        conn, SUD, "txn-00000001", [envelope(sender=BOB, rcpt=(ALICE,))], now=NOW
    )
    assert outcomes == [Outcome(True)] and woken == {NORD}
    assert len(queue(conn)) == 2


def test_the_same_envelope_in_a_new_transaction_is_accepted_not_queued_twice(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW)
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope(), envelope()], now=NOW)
    assert outcomes == [Outcome(True), Outcome(True)]
    assert woken == set()
    assert len(queue(conn)) == 1
    # The same message id for another destination domain is another envelope.
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, "txn-00000003",
                                                   [envelope(rcpt=(DAVE,), to=(BOB, CAROL, DAVE))], now=NOW)
    assert outcomes == [Outcome(True)] and woken == {EST}
    assert len(queue(conn)) == 2


# -- fetch_inbox -----------------------------------------------------------------------------


def fill(conn: sqlite3.Connection) -> dict[str, int]:
    """Queue for SUD, alternating lanes; return each message id's position."""
    lanes = ["normal", "urgent", "normal", "urgent", "normal"]
    raw = [envelope(f"msg-0000000{i}", priority=p) for i, p in enumerate(lanes)]
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", raw, now=NOW)
    hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope(rcpt=(DAVE,))], now=NOW)  # EST's
    return {payload(conn, seq)["id"]: seq for seq, domain, *_ in queue(conn) if domain == SUD}


def ids(conn: sqlite3.Connection, rows) -> list[str]:
    return [protocol.unpack(p, "payload")["id"] for _, _, _, p in rows]


def test_fetch_inbox_is_urgent_first_then_in_order(conn) -> None:
    fill(conn)
    rows = hub_queue.fetch_inbox(conn, SUD, {URGENT: 0, NORMAL: 0}, 100, now=NOW)
    assert ids(conn, rows) == ["msg-00000001", "msg-00000003", "msg-00000000", "msg-00000002", "msg-00000004"]
    assert [lane for _, lane, _, _ in rows] == [URGENT, URGENT, NORMAL, NORMAL, NORMAL]
    assert {kind for _, _, kind, _ in rows} == {"message"}
    # Payloads are complete, stamped envelopes.
    assert all(Envelope.from_wire(protocol.unpack(p, "p")).origin == NORD for *_, p in rows)


def test_fetch_inbox_respects_per_lane_positions_and_limit(conn) -> None:
    seq = fill(conn)
    assert ids(conn, hub_queue.fetch_inbox(conn, SUD, {URGENT: 0, NORMAL: 0}, 3, now=NOW)) == [
        "msg-00000001", "msg-00000003", "msg-00000000"]
    # Urgent sent up to msg 3, normal up to msg 0: the rest of each lane.
    after = {URGENT: seq["msg-00000003"], NORMAL: seq["msg-00000000"]}
    assert ids(conn, hub_queue.fetch_inbox(conn, SUD, after, 100, now=NOW)) == ["msg-00000002", "msg-00000004"]
    # An urgent item queued later comes before the remaining normal ones, although
    # its position is above them: the lanes are read independently.
    hub_queue.accept_transaction(conn, NORD, "txn-00000003", [envelope("msg-00000009", priority="urgent")], now=NOW)
    assert ids(conn, hub_queue.fetch_inbox(conn, SUD, after, 100, now=NOW)) == [
        "msg-00000009", "msg-00000002", "msg-00000004"]
    everything = {URGENT: max(seq.values()) + 100, NORMAL: max(seq.values()) + 100}
    assert hub_queue.fetch_inbox(conn, SUD, everything, 100, now=NOW) == []
    assert ids(conn, hub_queue.fetch_inbox(conn, EST, {URGENT: 0, NORMAL: 0}, 100, now=NOW)) == ["msg-00000001"]
    assert hub_queue.fetch_inbox(conn, "quiet.test", {URGENT: 0, NORMAL: 0}, 100, now=NOW) == []


# -- apply_ack --------------------------------------------------------------------------------


def test_an_ack_deletes_and_sends_delivered_receipts_to_the_origin(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope("msg-00000001"), envelope("msg-00000002")],
                                 now=NOW)
    seqs = [seq for seq, *_ in queue(conn)]
    woken = hub_queue.apply_ack(conn, SUD, seqs, [], now=NOW)
    assert woken == {NORD}
    rows = queue(conn)
    assert [(d, lane, kind, origin) for _, d, lane, kind, origin in rows] == [(NORD, URGENT, "receipt", "")] * 2
    receipts = [Receipt.from_wire(payload(conn, seq)) for seq, *_ in rows]
    assert receipts == [
        Receipt("msg-00000001", (BOB, CAROL), "delivered"),
        Receipt("msg-00000002", (BOB, CAROL), "delivered"),
    ]
    # The origin fetches them from its own inbox, urgent lane.
    fetched = hub_queue.fetch_inbox(conn, NORD, {URGENT: 0, NORMAL: 0}, 10, now=NOW)
    assert [kind for _, _, kind, _ in fetched] == ["receipt", "receipt"]


def test_failures_in_an_ack_become_failed_receipts(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope("msg-00000001"), envelope("msg-00000002")],
                                 now=NOW)
    one, two = [seq for seq, *_ in queue(conn)]
    failures = [
        Failure(one, (CAROL,), protocol.UNKNOWN_RECIPIENT),
        Failure(two, (BOB, CAROL), "misrouted"),
        Failure(99999, (BOB,), "about a position not acked: ignored"),
    ]
    assert hub_queue.apply_ack(conn, SUD, [one, two], failures, now=NOW) == {NORD}
    receipts = [Receipt.from_wire(payload(conn, seq)) for seq, *_ in queue(conn)]
    assert receipts == [
        Receipt("msg-00000001", (BOB,), "delivered"),
        Receipt("msg-00000001", (CAROL,), "failed", protocol.UNKNOWN_RECIPIENT),
        Receipt("msg-00000002", (BOB, CAROL), "failed", "misrouted"),
    ]


def test_a_relay_cannot_ack_another_domains_queue(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW)
    before = queue(conn)
    [(seq, *_)] = before
    assert hub_queue.apply_ack(conn, EST, [seq], [Failure(seq, (BOB,), "unknown_recipient")], now=NOW) == set()
    assert hub_queue.apply_ack(conn, NORD, [seq], [], now=NOW) == set()  # not even the sender
    assert queue(conn) == before


def test_positions_acked_twice_are_ignored(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW)
    [(seq, *_)] = queue(conn)
    assert hub_queue.apply_ack(conn, SUD, [seq, seq], [], now=NOW) == {NORD}
    after_first = queue(conn)
    assert len(after_first) == 1  # one receipt, not two
    assert hub_queue.apply_ack(conn, SUD, [seq], [], now=NOW) == set()
    assert queue(conn) == after_first


def test_acking_a_receipt_deletes_it_and_sends_nothing(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW)
    [(seq, *_)] = queue(conn)
    hub_queue.apply_ack(conn, SUD, [seq], [], now=NOW)
    [(receipt_seq, domain, *_)] = queue(conn)
    assert domain == NORD
    assert hub_queue.apply_ack(conn, NORD, [receipt_seq], [], now=NOW) == set()
    assert queue(conn) == []
    assert hub_queue.backlog(conn) == {}


# -- through a real Store ------------------------------------------------------------------------


async def test_a_replay_in_the_same_group_queues_once(tmp_path: Path) -> None:
    """The relay retries a transaction whose answer it lost while the first
    attempt is still queued: both land in one group; the second sees the first."""
    path = tmp_path / "hub.db"
    with trio.fail_after(STEP):
        async with Store.open(path, hub_queue.MIGRATIONS) as store:
            await store.run("domains", lambda c: hub_queue.register_domains(c, frozenset({NORD, SUD}), False, now=NOW))
            answers = []

            async def send() -> None:
                answers.append(await store.run(
                    "accept", lambda c: hub_queue.accept_transaction(c, NORD, "txn-00000001", [envelope()], now=NOW)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(send)
        assert sorted(len(woken) for _, woken in answers) == [0, 1]
        assert [outcomes for outcomes, _ in answers] == [[Outcome(True)]] * 2

        async with Store.open(path, hub_queue.MIGRATIONS) as store:
            rows = await store.read("fetch",
                                    lambda c: hub_queue.fetch_inbox(c, SUD, {URGENT: 0, NORMAL: 0}, 10, now=NOW))
    assert len(rows) == 1


def test_read_receipts_only_about_messages_the_relay_acknowledged(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-read-0001", [envelope("msg-read-0001", rcpt=(BOB,))], now=NOW)
    read = Receipt("msg-read-0001", (BOB,), "read", origin=NORD).to_wire()
    [refused], _ = hub_queue.accept_receipts(conn, SUD, [read], now=NOW)
    assert (refused.accepted, refused.reason) == (False, protocol.UNKNOWN_MESSAGE)  # queued, not yet taken
    [(seq, *_)] = hub_queue.fetch_inbox(conn, SUD, {hub_queue.URGENT: 0, hub_queue.NORMAL: 0}, 10, now=NOW)
    hub_queue.apply_ack(conn, SUD, [seq], [], now=NOW)
    [accepted], woken = hub_queue.accept_receipts(conn, SUD, [read], now=NOW)
    assert accepted.accepted and woken == {NORD}


def test_an_item_that_cannot_be_opened_is_fetched_as_none_then_dropped_with_a_trace(tmp_path: Path) -> None:
    ring = sealing.KeyRing({1: bytes(32)}, 1)
    conn = connect(tmp_path / "hub.db", ring)
    migrate(conn, hub_queue.MIGRATIONS, "hub")
    hub_queue.register_domains(conn, frozenset({NORD, SUD}), learnt=False, now=NOW)
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope("msg-00000001"), envelope("msg-00000002")],
                                 now=NOW)
    first, second = [seq for seq, *_ in queue(conn)]
    [(sealed,)] = conn.execute("SELECT payload FROM queue WHERE seq = ?", (first,))
    conn.execute("UPDATE queue SET payload = ? WHERE seq = ?", (sealed[:-1] + bytes([sealed[-1] ^ 1]), first))
    rows = hub_queue.fetch_inbox(conn, SUD, {URGENT: 0, NORMAL: 0}, 10, now=NOW)
    assert [(seq, payload is None) for seq, _, _, payload in rows] == [(first, True), (second, False)]
    hub_queue.drop_unreadable(conn, SUD, [first], now=NOW)
    assert [seq for seq, *_ in queue(conn)] == [second]
    assert conn.execute("SELECT action, peer, outcome FROM audit WHERE action = 'dropped'").fetchall() == [
        ("dropped", SUD, f"queue item {first} cannot be opened")]
    conn.close()


# -- the replay window ------------------------------------------------------------------------

WINDOW = 10 * 86400.0
# The first moment at which a record made at NOW may be pruned.
FORGET = NOW + WINDOW + hub_queue.CLOCK_AHEAD


def replay_rows(conn) -> tuple[int, int]:
    return (conn.execute("SELECT count(*) FROM seen").fetchone()[0],
            conn.execute("SELECT count(*) FROM txn").fetchone()[0])


def test_replay_records_are_pruned_only_past_the_window(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(), envelope("msg-00000002", rcpt=[DAVE])],
                                 now=NOW, replay_window=WINDOW)
    hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope("msg-00000003")], now=NOW + 1,
                                 replay_window=WINDOW)
    assert replay_rows(conn) == (3, 2)
    assert hub_queue.prune_replays(conn, FORGET, WINDOW) == {"seen": 0, "txn": 0}
    assert hub_queue.prune_replays(conn, FORGET + 0.5, WINDOW) == {"seen": 2, "txn": 1}
    assert replay_rows(conn) == (1, 1)
    assert hub_queue.prune_replays(conn, FORGET + 1.5, WINDOW) == {"seen": 1, "txn": 1}
    assert replay_rows(conn) == (0, 0)


def test_pruning_goes_in_batches(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope(f"msg-0000000{n}") for n in range(3)],
                                 now=NOW, replay_window=WINDOW)
    assert hub_queue.prune_replays(conn, FORGET + 1, WINDOW, limit=2) == {"seen": 2, "txn": 1}
    assert hub_queue.prune_replays(conn, FORGET + 1, WINDOW, limit=2) == {"seen": 1, "txn": 0}


@pytest.mark.parametrize("same_txn", [True, False], ids=["same transaction id", "new transaction id"])
def test_a_replay_whose_records_are_pruned_is_refused_as_expired_never_queued_again(conn, same_txn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=NOW, replay_window=WINDOW)
    [(seq, *_)] = queue(conn)
    hub_queue.apply_ack(conn, SUD, [seq], [], now=NOW + 10)  # delivered, then acknowledged
    queued = queue(conn)
    later = FORGET + 1
    hub_queue.prune_replays(conn, later, WINDOW)
    assert replay_rows(conn) == (0, 0)
    txn = "txn-00000001" if same_txn else "txn-00000002"
    outcomes, woken = hub_queue.accept_transaction(conn, NORD, txn, [envelope()], now=later, replay_window=WINDOW)
    assert [(o.accepted, o.reason) for o in outcomes] == [(False, protocol.EXPIRED)]
    assert woken == set() and queue(conn) == queued  # the delivery receipt only: nothing queued twice


def test_an_envelope_older_than_the_window_is_refused_even_before_any_pruning(conn) -> None:
    sent = 1_700_000_000.0  # the envelope's sent_at
    outcomes, _ = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()], now=sent + WINDOW + 1,
                                               replay_window=WINDOW)
    assert [(o.accepted, o.reason) for o in outcomes] == [(False, protocol.EXPIRED)]
    outcomes, _ = hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope()], now=sent + WINDOW,
                                               replay_window=WINDOW)
    assert outcomes == [Outcome(True)]


def test_an_envelope_sent_too_far_ahead_of_the_hubs_clock_is_refused(conn) -> None:
    """Its filter entry would have to outlive the window by as much: the
    bound on how far ahead it may be is what makes pruning safe."""
    sent = 1_700_000_000.0
    outcomes, _ = hub_queue.accept_transaction(conn, NORD, "txn-00000001", [envelope()],
                                               now=sent - hub_queue.CLOCK_AHEAD - 1, replay_window=WINDOW)
    assert [(o.accepted, o.reason) for o in outcomes] == [(False, protocol.INVALID_ENVELOPE)]
    assert "ahead of the hub's clock" in outcomes[0].detail
    outcomes, _ = hub_queue.accept_transaction(conn, NORD, "txn-00000002", [envelope()],
                                               now=sent - hub_queue.CLOCK_AHEAD, replay_window=WINDOW)
    assert outcomes == [Outcome(True)] and replay_rows(conn) == (1, 2)


def test_backlog_per_domain_and_lane(conn) -> None:
    hub_queue.accept_transaction(conn, NORD, "txn-00000001",
                                 [envelope("msg-00000001", priority="urgent"), envelope("msg-00000002"),
                                  envelope("msg-00000003"), envelope("msg-00000004", rcpt=[DAVE])], now=NOW)
    assert hub_queue.backlog(conn) == {SUD: {URGENT: 1, NORMAL: 2}, EST: {URGENT: 0, NORMAL: 1}}
