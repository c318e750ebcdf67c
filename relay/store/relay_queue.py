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
`relay_events`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay.core import protocol
from relay.core.priority import NORMAL, URGENT, lane_of, priority_of
from relay.core.protocol import Envelope, Outcome, Receipt
from relay.core.timeformat import iso
from relay.store import audit

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
]

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


def next_batch(
    conn: sqlite3.Connection, domain: str, limit: int, *, now: float,
    lane: int | None = None, after: int = 0,
) -> list[tuple[int, Envelope]]:
    """The next envelopes to send, urgent first (or of one ``lane`` only),
    each lane in submission order, past outbox position ``after`` (what is
    already with the hub and not settled here: always the front of a lane,
    as positions only grow); at most ``limit`` of them and about
    `BATCH_BYTES`.  Envelopes are still sent during their expiry grace: one
    the hub accepted while the answer was lost is then answered "accepted",
    not failed here."""
    lanes = (URGENT, NORMAL) if lane is None else (lane,)
    rows = conn.execute(
        f"""SELECT o.seq, o.dest, m.id, m.sender, m.recipients, m.thread, m.priority, unseal(m.body, m.id),
                  m.accepted_at, m.expires_at
           FROM outbox o JOIN message m ON m.id = o.message_id
           WHERE o.domain = ? AND o.lane IN ({",".join("?" * len(lanes))}) AND o.seq > ?
             AND (m.sweep_at IS NULL OR m.sweep_at >= ?)
           ORDER BY o.lane DESC, o.seq LIMIT ?""",
        (domain, *lanes, after, now, limit),
    )
    batch: list[tuple[int, Envelope]] = []
    size = 0
    for seq, dest, ident, sender, recipients, thread, priority, body, accepted_at, expires_at in rows:
        size += len(body) * 4 + len(recipients) * 2 + 256  # bounds the UTF-8 and msgpack sizes
        if batch and size > BATCH_BYTES:
            break
        to = tuple(protocol.unpack(recipients, "stored recipients"))
        rcpt = tuple(a for a in to if protocol.domain_of(a) == dest)
        envelope = Envelope(ident, sender, to, rcpt, body, thread, priority, accepted_at, expires_at=expires_at)
        batch.append((seq, envelope))
    return batch


def apply_outcomes(
    conn: sqlite3.Connection, results: Iterable[tuple[int, Envelope, Outcome]], *, now: float
) -> set[str]:
    """The hub answered a transaction: each envelope leaves the outbox.
    Returns the local systems notified of a failure."""
    results = list(results)
    _leave_outbox(conn, [(seq, envelope.id) for seq, envelope, _ in results])
    notified: set[str] = set()
    advance(conn, [(envelope.id, address) for _, envelope, outcome in results if outcome.accepted
                   for address in envelope.rcpt], "sent", now=now)
    for _, envelope, outcome in results:
        if not outcome.accepted:
            fail(conn, envelope.id, envelope.rcpt, outcome.reason, notified, now=now)
    audit.record_many(conn, [("relay", "sent", envelope.id, f"hub for {envelope.dest}", outcome.reason or "accepted")
                             for _, envelope, outcome in results], now=now)
    return notified


def expire(conn: sqlite3.Connection, now: float, notified: set[str]) -> int:
    """Fail the envelopes still queued here past their message's time-to-live
    and its grace (one may be in a transaction right now); return how many
    recipients that failed, adding their senders' systems to ``notified``."""
    rows = conn.execute(
        """SELECT o.seq, o.dest, m.id, m.recipients FROM outbox o JOIN message m ON m.id = o.message_id
           WHERE m.sweep_at < ?""",
        (now,),
    ).fetchall()
    failed = 0
    _leave_outbox(conn, [(seq, ident) for seq, _, ident, _ in rows])
    for _seq, dest, ident, recipients in rows:
        rcpt = [a for a in protocol.unpack(recipients, "stored recipients") if protocol.domain_of(a) == dest]
        failed += fail(conn, ident, rcpt, protocol.EXPIRED, notified, now=now)
        audit.record(conn, "relay", "expired", ident, dest, "failed", now=now)
    return failed


def _leave_outbox(conn: sqlite3.Connection, envelopes: list[tuple[int, str]]) -> None:
    """Take envelopes (seq, message id) out of the outbox; once a message's
    last envelope is out, its body is no longer needed here and is dropped,
    so that the space it took is free again (the store's ceiling counts on it)."""
    conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in envelopes])
    conn.executemany(
        "UPDATE message SET body = '' WHERE id = ? AND NOT EXISTS (SELECT 1 FROM outbox WHERE message_id = ?)",
        [(ident, ident) for ident in dict.fromkeys(ident for _, ident in envelopes)],
    )


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
    return [
        (seq, Receipt(ident, tuple(protocol.unpack(rcpt, "stored receipt")), status, origin=origin))
        for seq, origin, ident, rcpt, status in rows
    ]


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


# -- queries and units of the operations tools (``eimis-relay queue``, ``status``) --------
#
# They run through the daemon's store like any unit (or, with no daemon, in
# the command's own store, under the state directory's lock): the store keeps
# one writer either way.

QUEUE_STATES = ("queued", "sent", "failed")
RETRIED, PURGED = "retried", "purged"


def queue_messages(conn: sqlite3.Connection, state: str | None, to_domain: str | None, limit: int) -> list[dict]:
    """Messages that are not yet delivered to everyone, oldest first: those
    with a recipient in ``state`` (any of `QUEUE_STATES` when None), and at
    ``to_domain`` when given."""
    states = (state,) if state else QUEUE_STATES
    marks = ",".join("?" * len(states))
    where = f"r.status IN ({marks})"
    params: list[object] = list(states)
    if to_domain:
        where += " AND r.address LIKE ? ESCAPE '\\'"
        params.append("%@" + to_domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
    rows = conn.execute(
        f"""SELECT m.id, m.accepted_at, m.priority, m.sender, m.system FROM message m
            WHERE EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = m.id AND {where})
            ORDER BY m.accepted_at, m.id LIMIT ?""",
        (*params, limit),
    ).fetchall()
    listing = []
    for ident, accepted_at, priority, sender, system in rows:
        recipients = _recipients(conn, ident)
        listing.append({"id": ident, "accepted_at": iso(accepted_at), "priority": priority, "from": sender,
                        "system": system, "status": overall_status(r["status"] for r in recipients.values()),
                        "recipients": {a: r["status"] for a, r in recipients.items()}})
    return listing


def queue_message(conn: sqlite3.Connection, ident: str, with_body: bool) -> dict | None:
    """Everything known about one message sent from here; its body only
    when asked, and only while the relay still holds it."""
    row = conn.execute(
        "SELECT sender, system, priority, thread, accepted_at, expires_at, unseal(body, id), delay_noticed"
        " FROM message WHERE id = ?", (ident,)
    ).fetchone()
    if row is None:
        return None
    sender, system, priority, thread, accepted_at, expires_at, body, delay_noticed = row
    waiting = [dest for (dest,) in conn.execute("SELECT dest FROM outbox WHERE message_id = ? ORDER BY seq", (ident,))]
    recipients = _recipients(conn, ident)
    document = {
        "id": ident, "from": sender, "system": system, "priority": priority, "thread": thread,
        "accepted_at": iso(accepted_at), "expires_at": iso(expires_at) if expires_at else None,
        "status": overall_status(r["status"] for r in recipients.values()), "recipients": recipients,
        "waiting_for_hub": waiting, "delay_noticed": bool(delay_noticed),
        # The body is dropped once the hub has taken (or refused) every envelope.
        "body_kept": bool(waiting), "body_bytes": len(body.encode()),
    }
    if with_body:
        document["body"] = body if waiting else None
    return document


def _recipients(conn: sqlite3.Connection, ident: str) -> dict[str, dict]:
    return {
        address: {"status": status, "reason": reason, "updated_at": iso(updated_at)}
        for address, status, reason, updated_at in conn.execute(
            "SELECT address, status, reason, updated_at FROM recipient WHERE message_id = ? ORDER BY address",
            (ident,))
    }


def retry_failed(conn: sqlite3.Connection, idents: list[str] | None, ttl: float, now: float) -> dict[str, str]:
    """Queue again the failed recipients of the given messages (every
    message with one, when None); return what happened to each, by id:
    `RETRIED`, or why not.

    Only a message whose body is still here can go again: the relay drops a
    body once the hub has taken or refused every envelope of it, so in
    practice that is a message with another envelope still queued.  A
    retried message gets a fresh time-to-live, and may be noticed as
    delayed again.
    """
    if idents is None:
        idents = [ident for (ident,) in conn.execute(
            "SELECT DISTINCT message_id FROM recipient WHERE status = 'failed' ORDER BY message_id")]
    results: dict[str, str] = {}
    for ident in idents:
        row = conn.execute("SELECT priority FROM message WHERE id = ?", (ident,)).fetchone()
        failed = [a for (a,) in conn.execute(
            "SELECT address FROM recipient WHERE message_id = ? AND status = 'failed'", (ident,))]
        waiting = {d for (d,) in conn.execute("SELECT dest FROM outbox WHERE message_id = ?", (ident,))}
        if row is None:
            results[ident] = "no such message"
        elif not failed:
            results[ident] = "no failed recipient"
        elif not waiting:
            results[ident] = "body no longer kept (the hub took or refused every envelope): send it again"
        else:
            conn.executemany(
                "UPDATE recipient SET status = 'queued', reason = NULL, updated_at = ? WHERE message_id = ?"
                " AND address = ?", [(now, ident, a) for a in failed])
            lane = lane_of(row[0])
            dests = dict.fromkeys(protocol.domain_of(a) for a in failed)
            conn.executemany("INSERT INTO outbox (domain, message_id, dest, lane) SELECT domain, id, ?, ?"
                             " FROM message WHERE id = ?",
                             [(dest, lane, ident) for dest in dests if dest not in waiting])
            conn.execute("UPDATE message SET expires_at = ?, sweep_at = ?, delay_noticed = 0 WHERE id = ?",
                         (now + ttl, protocol.sweep_time(now, now + ttl), ident))
            results[ident] = RETRIED
        audit.record(conn, "admin", "queue retry", ident, None, results[ident], now=now)
    return results


def purge(conn: sqlite3.Connection, ident: str, *, now: float) -> tuple[int, set[str]] | None:
    """Take a message out of the outbox: its queued recipients fail with
    reason ``purged`` (the sending system gets a ``failed`` notice, as for
    any bounce).  Returns how many recipients that failed and the systems
    notified, or None when there is no such message."""
    if conn.execute("SELECT 1 FROM message WHERE id = ?", (ident,)).fetchone() is None:
        return None
    notified: set[str] = set()
    queued = [a for (a,) in conn.execute(
        "SELECT address FROM recipient WHERE message_id = ? AND status = 'queued'", (ident,))]
    _leave_outbox(conn, [(seq, ident) for (seq,) in conn.execute("SELECT seq FROM outbox WHERE message_id = ?",
                                                                  (ident,)).fetchall()])
    failed = fail(conn, ident, queued, PURGED, notified, now=now)
    audit.record(conn, "admin", "queue purge", ident, None, f"{failed} recipient(s) failed", now=now)
    return failed, notified


def queue_summary(conn: sqlite3.Connection) -> dict:
    """What ``status`` and the metrics show of the queues: outbound
    envelopes by priority, the oldest queued message, recipients by status,
    and per local system its messages not marked read and the events its
    webhook has not pushed yet."""
    oldest = conn.execute(
        "SELECT min(m.accepted_at) FROM outbox o JOIN message m ON m.id = o.message_id").fetchone()[0]
    by_status = dict.fromkeys(QUEUE_STATES, 0)
    by_status.update(conn.execute("SELECT status, count(*) FROM recipient WHERE status IN ('queued', 'sent',"
                                  " 'failed') GROUP BY status").fetchall())
    unread = dict(conn.execute("SELECT system, count(*) FROM event WHERE type = 'message' AND read_at IS NULL"
                               " GROUP BY system").fetchall())
    pushed = dict(conn.execute(
        "SELECT w.system, count(e.cursor) FROM webhook w LEFT JOIN event e ON e.system = w.system"
        " AND e.cursor > w.cursor GROUP BY w.system").fetchall())
    return {"outbound": outbox_depth(conn), "oldest_queued_at": oldest, "recipients": by_status,
            "unread": unread, "webhook_backlog": pushed}


def delivery_facts(conn: sqlite3.Connection, idents: Iterable[str]) -> dict[str, tuple[str, float]]:
    """The priority and acceptance time of messages sent from here (for
    the delivery counters and latency), by id; unknown ids are left out."""
    facts = {}
    for ident in set(idents):
        row = conn.execute("SELECT priority, accepted_at FROM message WHERE id = ?", (ident,)).fetchone()
        if row is not None:
            facts[ident] = (row[0], row[1])
    return facts
