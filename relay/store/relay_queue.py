"""The relay's durable state and the units of work that change it.

Each function here is a unit for `Store.run` (see `store.py`).  Rows carry
the relay's own domain so that one appliance can later serve several legal
entities, each with its own certificate and connection.

Tables
  message     what the local systems submitted, with the submitting system
              and its Idempotency-Key (unique per system)
  recipient   per-recipient status: queued -> sent -> delivered | failed;
              a status only ever moves forward, so late or repeated news
              (a ``sent`` answer after the ``delivered`` receipt) is harmless
  outbox      envelopes still to hand to the hub, one per (message,
              destination domain), urgent lane first, then submission order
  inbound     messages received from the hub, unique per (origin, id): the
              duplicate filter of this hop
  event       what each local system reads from ``GET /v1/events``: the
              messages for its users, and notices about the messages it
              sent (``delayed``, ``failed``); the cursor is the row id, so
              it is positive and increasing
  receipt_out read receipts waiting to go up to the hub
  webhook     how far each local system's webhook has been fed

The incoming side (inbound, event, webhook) has its units in
`relay_inbox`; the operations tools' queries and units in `relay_admin`.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from relay.core import protocol
from relay.core.priority import NORMAL, URGENT, lane_of, priority_of
from relay.core.protocol import Envelope, Outcome, Receipt
from relay.core.timeformat import iso
from relay.store import audit, sealing

log = logging.getLogger(__name__)

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE message (
            id TEXT PRIMARY KEY, domain TEXT NOT NULL, system TEXT NOT NULL, idem_key TEXT,
            sender TEXT NOT NULL, recipients BLOB NOT NULL, thread TEXT, priority TEXT NOT NULL,
            body TEXT NOT NULL, accepted_at REAL NOT NULL)""",
        "CREATE UNIQUE INDEX message_idem ON message (system, idem_key) WHERE idem_key IS NOT NULL",
        """CREATE TABLE recipient (
            message_id TEXT NOT NULL REFERENCES message (id), address TEXT NOT NULL,
            status TEXT NOT NULL, reason TEXT, updated_at REAL NOT NULL,
            PRIMARY KEY (message_id, address)) WITHOUT ROWID""",
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, domain TEXT NOT NULL,
            message_id TEXT NOT NULL REFERENCES message (id), dest TEXT NOT NULL, lane INTEGER NOT NULL)""",
        "CREATE INDEX outbox_order ON outbox (domain, lane DESC, seq)",
        """CREATE TABLE inbound (
            rowid INTEGER PRIMARY KEY, domain TEXT NOT NULL, origin TEXT NOT NULL, id TEXT NOT NULL,
            sender TEXT NOT NULL, recipients BLOB NOT NULL, thread TEXT, priority TEXT NOT NULL,
            body TEXT NOT NULL, sent_at REAL NOT NULL, received_at REAL NOT NULL,
            UNIQUE (origin, id))""",
        """CREATE TABLE event (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT, system TEXT NOT NULL,
            inbound INTEGER NOT NULL REFERENCES inbound (rowid))""",
        "CREATE INDEX event_by_system ON event (system, cursor)",
    ],
    [
        # Time-to-live, and the "delayed" notice sent once per message.
        "ALTER TABLE message ADD COLUMN expires_at REAL",
        "UPDATE message SET expires_at = accepted_at + 7 * 86400",
        "ALTER TABLE message ADD COLUMN sweep_at REAL",  # see protocol.sweep_time
        f"UPDATE message SET sweep_at = expires_at + {protocol.EXPIRY_GRACE}",
        "ALTER TABLE message ADD COLUMN delay_noticed INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX message_by_age ON message (delay_noticed, accepted_at)",
        # inbound: unique per receiving domain too; event: notices besides
        # messages, a creation time for retention, a read mark.
        """CREATE TABLE inbound2 (
            rowid INTEGER PRIMARY KEY, domain TEXT NOT NULL, origin TEXT NOT NULL, id TEXT NOT NULL,
            sender TEXT NOT NULL, recipients BLOB NOT NULL, thread TEXT, priority TEXT NOT NULL,
            body TEXT NOT NULL, sent_at REAL NOT NULL, received_at REAL NOT NULL, origin_org TEXT,
            UNIQUE (domain, origin, id))""",
        "INSERT INTO inbound2 SELECT *, NULL FROM inbound",
        """CREATE TABLE event2 (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT, system TEXT NOT NULL, type TEXT NOT NULL,
            inbound INTEGER REFERENCES inbound2 (rowid), notice TEXT, created_at REAL NOT NULL, read_at REAL)""",
        """INSERT INTO event2 (cursor, system, type, inbound, created_at)
           SELECT e.cursor, e.system, 'message', e.inbound, i.received_at
           FROM event e JOIN inbound i ON i.rowid = e.inbound""",
        "DROP TABLE event",
        "DROP TABLE inbound",
        "ALTER TABLE inbound2 RENAME TO inbound",
        "ALTER TABLE event2 RENAME TO event",
        "CREATE INDEX event_by_system ON event (system, cursor)",
        "CREATE INDEX event_by_age ON event (created_at)",
        "CREATE INDEX event_by_inbound ON event (inbound)",
        """CREATE TABLE receipt_out (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, domain TEXT NOT NULL, origin TEXT NOT NULL,
            id TEXT NOT NULL, rcpt BLOB NOT NULL, status TEXT NOT NULL)""",
        "CREATE TABLE webhook (system TEXT PRIMARY KEY, cursor INTEGER NOT NULL)",
    ],
    audit.MIGRATION,
    [
        # Leaving the outbox asks whether a message has envelopes left: without
        # this index that was a scan of the whole outbox per envelope, and a
        # 100,000-message backlog drained at about a hundred a second.
        "CREATE INDEX outbox_by_message ON outbox (message_id)",
    ],
    [
        # `queue retry`: an envelope sent again gets a new envelope id (the
        # hub's duplicate filter would drop the old one), `envelope_id`;
        # the destination keeps the id of the envelope it took, for its
        # read receipts.  A body is kept while a recipient may still need
        # it (queued, sent, or failed within the retry window): the
        # partial index finds the bodies still held.
        "ALTER TABLE message ADD COLUMN retries INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE outbox ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE inbound ADD COLUMN envelope_id TEXT",
        "CREATE INDEX message_holding_body ON message (accepted_at) WHERE body != ''",
        "CREATE INDEX recipient_failed ON recipient (updated_at) WHERE status = 'failed'",
    ],
]

# Why a recipient failed when the relay cannot open its message's stored
# body (a damaged row, or a key ring without its key): see `fail_damaged`.
UNREADABLE = "unreadable"

# The envelope id of a retry: the message id, then "-r" and the attempt.
# Message ids made here are hex (`protocol.new_message_id`), so the suffix
# cannot be part of one.
_RETRY_SUFFIX = re.compile(r"-r([1-9][0-9]{0,5})$")


def envelope_id(message_id: str, attempt: int) -> str:
    """The id the hub sees for attempt ``attempt`` of a message (0: the
    first, whose envelope id is the message id)."""
    return message_id if attempt == 0 else f"{message_id}-r{attempt}"


def message_id_of(envelope_id: str) -> str:
    """The message id behind an envelope id this relay made (hub answers
    and receipts name envelopes)."""
    return _RETRY_SUFFIX.sub("", envelope_id)

# The statuses a recipient may move to, from each status.
_ADVANCES_FROM = {
    "sent": ("queued",),
    "delivered": ("queued", "sent"),
    "read": ("queued", "sent", "delivered"),
    "failed": ("queued", "sent"),
}


@dataclass(frozen=True)
class Submission:
    """A message a local system asked to send, already validated."""

    id: str
    domain: str
    system: str
    idem_key: str | None
    sender: str
    to: tuple[str, ...]
    thread: str | None
    priority: str
    body: str
    ttl: float = 7 * 86400


class StoreFull(Exception):
    """No room for this message: the store is above its ceiling (or, for a
    normal message, its high-water mark)."""


def submit(
    conn: sqlite3.Connection, msg: Submission, has_room: Callable[[str], bool] = lambda _: True, *, now: float
) -> tuple[str, str]:
    """Store a new message and its envelopes; return its id and status.

    With an Idempotency-Key already used by the same system, nothing is
    stored and the first message's id and current status are returned,
    even when the store is full.  Otherwise ``has_room(priority)`` must
    agree, or `StoreFull` is raised.
    """
    if msg.idem_key is not None:
        row = conn.execute(
            "SELECT id FROM message WHERE system = ? AND idem_key = ?", (msg.system, msg.idem_key)
        ).fetchone()
        if row is not None:
            statuses = [r[0] for r in conn.execute("SELECT status FROM recipient WHERE message_id = ?", row)]
            return row[0], overall_status(statuses)
    if not has_room(msg.priority):
        raise StoreFull(msg.priority)
    conn.execute(
        "INSERT INTO message (id, domain, system, idem_key, sender, recipients, thread, priority, body, accepted_at,"
        " expires_at, sweep_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, seal(?, ?), ?, ?, ?)",
        (msg.id, msg.domain, msg.system, msg.idem_key, msg.sender, protocol.pack(list(msg.to)),
         msg.thread, msg.priority, msg.body, msg.id, now, now + msg.ttl, protocol.sweep_time(now, now + msg.ttl)),
    )
    conn.executemany(
        "INSERT INTO recipient (message_id, address, status, updated_at) VALUES (?, ?, 'queued', ?)",
        [(msg.id, address, now) for address in msg.to],
    )
    lane = lane_of(msg.priority)
    dests = dict.fromkeys(protocol.domain_of(a) for a in msg.to)
    conn.executemany(
        "INSERT INTO outbox (domain, message_id, dest, lane) VALUES (?, ?, ?, ?)",
        [(msg.domain, msg.id, dest, lane) for dest in dests],
    )
    audit.record(conn, f"system:{msg.system}", "accepted", msg.id, "local", f"{len(msg.to)} recipient(s)",
                 now=now)
    return msg.id, "queued"


# A transaction's envelopes add up to at most this many bytes of bodies and
# addresses, well inside the hub's limit on a transaction's size.
BATCH_BYTES = protocol.MAX_TRANSACTION_BYTES // 4


@dataclass(frozen=True)
class Damaged:
    """An outbox envelope whose stored message cannot be turned into an
    envelope (its body does not open, its recipients do not decode): it can
    never be sent, and must not hold up the envelopes behind it."""

    seq: int
    message_id: str
    dest: str
    why: str


@dataclass
class OutboxBatch:
    """What `next_batch` found: the ``envelopes`` to send, by outbox
    position, and the ``damaged`` ones the caller must hand to
    `fail_damaged` (a read cannot write)."""

    envelopes: list[tuple[int, Envelope]] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)


def next_batch(
    conn: sqlite3.Connection, domain: str, limit: int, *, now: float,
    lane: int | None = None, after: int = 0,
) -> OutboxBatch:
    """The next envelopes to send, urgent first (or of one ``lane`` only),
    each lane in submission order, past outbox position ``after`` (what is
    already with the hub and not settled here: always the front of a lane,
    as positions only grow); at most ``limit`` of them and about
    `BATCH_BYTES`.  Envelopes are still sent during their expiry grace: one
    the hub accepted while the answer was lost is then answered "accepted",
    not failed here.  A row that cannot be read is returned apart, as
    `Damaged` (one bad row must not stop the lane, nor crash the uplink)."""
    lanes = (URGENT, NORMAL) if lane is None else (lane,)
    rows = conn.execute(
        f"""SELECT o.seq, o.dest, o.attempt, m.id, m.sender, m.recipients, m.thread, m.priority, m.body,
                  m.accepted_at, m.expires_at
           FROM outbox o JOIN message m ON m.id = o.message_id
           WHERE o.domain = ? AND o.lane IN ({",".join("?" * len(lanes))}) AND o.seq > ?
             AND (m.sweep_at IS NULL OR m.sweep_at >= ?)
           ORDER BY o.lane DESC, o.seq LIMIT ?""",
        (domain, *lanes, after, now, limit),
    )
    found = OutboxBatch()
    size = 0
    for seq, dest, attempt, ident, sender, recipients, thread, priority, sealed, accepted_at, expires_at in rows:
        try:
            body = sealing.unseal(conn, sealed, ident)
            to = tuple(protocol.unpack(recipients, "stored recipients"))
            rcpt = _retried_recipients(conn, ident, dest) if attempt else tuple(
                a for a in to if protocol.domain_of(a) == dest)
            if not rcpt:
                raise ValueError(f"no recipient at {dest}")
        except (sealing.Unreadable, ValueError, TypeError) as exc:
            found.damaged.append(Damaged(seq, ident, dest, str(exc)))
            continue
        size += len(body) * 4 + len(recipients) * 2 + 256  # bounds the UTF-8 and msgpack sizes
        if found.envelopes and size > BATCH_BYTES:
            break
        envelope = Envelope(envelope_id(ident, attempt), sender, to, rcpt, body, thread, priority, accepted_at,
                            expires_at=expires_at, retry_of=ident if attempt else "")
        found.envelopes.append((seq, envelope))
    return found


def _retried_recipients(conn: sqlite3.Connection, ident: str, dest: str) -> tuple[str, ...]:
    """The recipients at ``dest`` a retry goes to: those `retry_failed`
    queued again, not those the first attempt reached."""
    return tuple(a for (a,) in conn.execute(
        "SELECT address FROM recipient WHERE message_id = ? AND status = 'queued' ORDER BY address", (ident,))
        if protocol.domain_of(a) == dest)


def fail_damaged(conn: sqlite3.Connection, damaged: Iterable[Damaged], *, now: float) -> set[str]:
    """Fail the envelopes `next_batch` could not read: out of the outbox,
    their recipients (from the recipient table, not the damaged row)
    ``failed`` with reason `UNREADABLE`, their sender notified, an audit
    entry each.  Returns the local systems notified."""
    notified: set[str] = set()
    for item in damaged:
        if conn.execute("SELECT 1 FROM outbox WHERE seq = ?", (item.seq,)).fetchone() is None:
            continue  # failed already (by another lane's read, a purge...)
        conn.execute("DELETE FROM outbox WHERE seq = ?", (item.seq,))
        rcpt = [a for (a,) in conn.execute("SELECT address FROM recipient WHERE message_id = ?", (item.message_id,))
                if protocol.domain_of(a) == item.dest]
        fail(conn, item.message_id, rcpt, UNREADABLE, notified, now=now)
        audit.record(conn, "relay", UNREADABLE, item.message_id, item.dest, item.why, now=now)
        log.error("message %s for %s cannot be sent and is failed: %s", item.message_id, item.dest, item.why,
                  extra={"message_id": item.message_id})
    return notified


def apply_outcomes(
    conn: sqlite3.Connection, results: Iterable[tuple[int, Envelope, Outcome]], *, now: float
) -> set[str]:
    """The hub answered a transaction: each envelope leaves the outbox.
    Returns the local systems notified of a failure."""
    results = list(results)
    leave_outbox(conn, [seq for seq, _, _ in results])
    notified: set[str] = set()
    advance(conn, [(message_id_of(envelope.id), address) for _, envelope, outcome in results if outcome.accepted
                   for address in envelope.rcpt], "sent", now=now)
    for _, envelope, outcome in results:
        if not outcome.accepted:
            fail(conn, message_id_of(envelope.id), envelope.rcpt, outcome.reason, notified, now=now)
    audit.record_many(conn, [("relay", "sent", envelope.id, f"hub for {envelope.dest}", outcome.reason or "accepted")
                             for _, envelope, outcome in results], now=now)
    return notified


def expire(conn: sqlite3.Connection, now: float, notified: set[str]) -> int:
    """Fail the envelopes still queued here past their message's time-to-live
    and its grace (one may be in a transaction right now); return how many
    recipients that failed, adding their senders' systems to ``notified``."""
    rows = conn.execute(
        """SELECT o.seq, o.dest, m.id FROM outbox o JOIN message m ON m.id = o.message_id
           WHERE m.sweep_at < ?""",
        (now,),
    ).fetchall()
    failed = 0
    leave_outbox(conn, [seq for seq, _, _ in rows])
    for _seq, dest, ident in rows:
        # From the recipient table, not the message's blob: a damaged row
        # must not stop the expiry of every other.
        rcpt = [a for (a,) in conn.execute("SELECT address FROM recipient WHERE message_id = ?", (ident,))
                if protocol.domain_of(a) == dest]
        failed += fail(conn, ident, rcpt, protocol.EXPIRED, notified, now=now)
        audit.record(conn, "relay", "expired", ident, dest, "failed", now=now)
    return failed


def leave_outbox(conn: sqlite3.Connection, seqs: list[int]) -> None:
    """Take envelopes out of the outbox (their bodies go later: `drop_bodies`)."""
    conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])


def drop_bodies(conn: sqlite3.Connection, now: float, retry_window: float) -> int:
    """Drop the bodies no recipient can need any more, so that the space
    they took is free again (the store's ceiling counts on it): a body is
    kept while the message has an envelope in the outbox or a recipient
    ``queued`` or ``sent`` (the hub may still fail it), and for
    ``retry_window`` seconds after a recipient's failure (`retry_failed`
    sends it again).  Returns how many went."""
    return conn.execute(
        """UPDATE message SET body = '' WHERE body != ''
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = message.id)
           AND NOT EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = message.id
                           AND (r.status IN ('queued', 'sent') OR (r.status = 'failed' AND r.updated_at >= ?)))""",
        (now - retry_window,),
    ).rowcount


def prune(conn: sqlite3.Connection, now: float, retention: float) -> int:
    """Forget the messages sent more than ``retention`` seconds ago that no
    longer wait for anything (their statuses stop being queryable); return
    how many went."""
    old = [row[0] for row in conn.execute(
        """SELECT id FROM message m WHERE accepted_at < ?
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id)
           AND NOT EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = m.id AND r.status IN ('queued', 'sent'))""",
        (now - retention,),
    )]
    conn.executemany("DELETE FROM recipient WHERE message_id = ?", [(ident,) for ident in old])
    conn.executemany("DELETE FROM message WHERE id = ?", [(ident,) for ident in old])
    return len(old)


def notice_delays(conn: sqlite3.Connection, now: float, delay: float) -> set[str]:
    """Post a ``delayed`` notice, once, for every message some recipient of
    which is still not delivered ``delay`` seconds after its acceptance;
    return the local systems notified."""
    rows = conn.execute(
        "SELECT id, system, accepted_at FROM message WHERE delay_noticed = 0 AND accepted_at < ?",
        (now - delay,),
    ).fetchall()
    notified: set[str] = set()
    for ident, system, accepted_at in rows:
        conn.execute("UPDATE message SET delay_noticed = 1 WHERE id = ?", (ident,))
        waiting = dict(conn.execute(
            "SELECT address, status FROM recipient WHERE message_id = ? AND status IN ('queued', 'sent')"
            " ORDER BY address", (ident,)))
        if waiting:
            post_notice(conn, system, "delayed", {"id": ident, "accepted_at": iso(accepted_at), "recipients": waiting},
                        now=now)
            notified.add(system)
    return notified


def post_notice(conn: sqlite3.Connection, system: str, kind: str, notice: dict, *, now: float) -> None:
    """An event for a sending system about one of its messages."""
    conn.execute(
        "INSERT INTO event (system, type, notice, created_at) VALUES (?, ?, ?, ?)",
        (system, kind, json.dumps(notice, separators=(",", ":")), now),
    )


def next_receipts(conn: sqlite3.Connection, domain: str, limit: int) -> list[tuple[int, Receipt]]:
    rows = conn.execute(
        "SELECT seq, origin, id, rcpt, status FROM receipt_out WHERE domain = ? ORDER BY seq LIMIT ?",
        (domain, limit),
    ).fetchall()
    return [(seq, Receipt(ident, _receipt_recipients(seq, rcpt), status, origin=origin))
            for seq, origin, ident, rcpt, status in rows]


def _receipt_recipients(seq: int, rcpt: bytes) -> tuple[str, ...]:
    """A damaged row goes with no recipient: the hub refuses it as invalid
    and the receipt sender drops it, instead of it blocking every receipt
    behind it."""
    try:
        return tuple(protocol.unpack(rcpt, "stored receipt"))
    except (ValueError, TypeError):
        log.error("read receipt %s cannot be read: sent empty, for the hub to refuse", seq)
        return ()


def drop_receipts(conn: sqlite3.Connection, seqs: list[int]) -> None:
    conn.executemany("DELETE FROM receipt_out WHERE seq = ?", [(seq,) for seq in seqs])


def advance(conn: sqlite3.Connection, moves: list[tuple[str, str]], status: str, *, now: float) -> int:
    """Move recipients, as (message id, address), forward to ``status``
    (never back), in one statement; return how many moved.  Not for a
    failure, which the sender must be told of: see `fail`."""
    assert status != "failed"
    if not moves:
        return 0
    before = _ADVANCES_FROM[status]
    placeholders = ",".join("?" * len(before))
    return conn.executemany(
        f"UPDATE recipient SET status = ?, reason = NULL, updated_at = ?"
        f" WHERE message_id = ? AND address = ? AND status IN ({placeholders})",
        [(status, now, ident, address, *before) for ident, address in moves],
    ).rowcount


def fail(
    conn: sqlite3.Connection, ident: str, rcpt: Iterable[str], reason: str | None, notified: set[str], *, now: float
) -> int:
    """Move recipients of a message to ``failed`` (from a status that may
    still fail); return how many moved.  The failure is posted as a
    ``failed`` notice to the system that sent the message (it bounces, the
    way a mail relay's would), and that system is added to ``notified``."""
    before = _ADVANCES_FROM["failed"]
    placeholders = ",".join("?" * len(before))
    moved = [
        address
        for address in rcpt
        if conn.execute(
            f"UPDATE recipient SET status = 'failed', reason = ?, updated_at = ?"
            f" WHERE message_id = ? AND address = ? AND status IN ({placeholders})",
            (reason, now, ident, address, *before),
        ).rowcount
    ]
    if moved:
        system = conn.execute("SELECT system FROM message WHERE id = ?", (ident,)).fetchone()[0]
        post_notice(conn, system, "failed", {"id": ident, "recipients": dict.fromkeys(moved, reason)}, now=now)
        notified.add(system)
    return len(moved)


def message_status(conn: sqlite3.Connection, ident: str, system: str) -> dict | None:
    """The status document of a message, or None when this system did not send it."""
    row = conn.execute("SELECT 1 FROM message WHERE id = ? AND system = ?", (ident, system)).fetchone()
    if row is None:
        return None
    recipients = {}
    for address, status, reason in conn.execute(
        "SELECT address, status, reason FROM recipient WHERE message_id = ? ORDER BY address", (ident,)
    ):
        recipients[address] = {"status": status, **({"reason": reason} if status == "failed" else {})}
    return {"id": ident, "status": overall_status(r["status"] for r in recipients.values()), "recipients": recipients}


_PROGRESS = ("queued", "sent", "failed", "delivered", "read")


def overall_status(statuses: Iterable[str]) -> str:
    """The least advanced recipient's status; a failure outranks a delivery."""
    return min(statuses, key=_PROGRESS.index, default="queued")


def outbox_depth(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT lane, count(*) FROM outbox GROUP BY lane").fetchall()
    depth = {"urgent": 0, "normal": 0}
    for lane, count in rows:
        depth[priority_of(lane)] = count
    return depth


def delivery_facts(conn: sqlite3.Connection, idents: Iterable[str]) -> dict[str, tuple[str, float]]:
    """The priority and acceptance time of messages sent from here (for
    the delivery counters and latency), by the envelope id given (a
    retry's names its message: `message_id_of`); unknown ids are left out."""
    facts = {}
    for ident in set(idents):
        row = conn.execute("SELECT priority, accepted_at FROM message WHERE id = ?",
                           (message_id_of(ident),)).fetchone()
        if row is not None:
            facts[ident] = (row[0], row[1])
    return facts
