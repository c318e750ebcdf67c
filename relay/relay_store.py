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
  event       what each local system reads from ``GET /v1/events``; the
              cursor is the row id, so it is positive and increasing
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from . import protocol
from .protocol import Envelope, Failure, InboxItem, Outcome

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
]

URGENT, NORMAL = 1, 0

# The statuses a recipient may move to, from each status.
_ADVANCES_FROM = {
    "sent": ("queued",),
    "delivered": ("queued", "sent"),
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


def submit(conn: sqlite3.Connection, msg: Submission) -> tuple[str, bool]:
    """Store a new message and its envelopes; return (id, created).

    With an Idempotency-Key already used by the same system, nothing is
    stored and the first message's id is returned.
    """
    if msg.idem_key is not None:
        row = conn.execute(
            "SELECT id FROM message WHERE system = ? AND idem_key = ?", (msg.system, msg.idem_key)
        ).fetchone()
        if row is not None:
            return row[0], False
    now = time.time()
    conn.execute(
        "INSERT INTO message (id, domain, system, idem_key, sender, recipients, thread, priority, body, accepted_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (msg.id, msg.domain, msg.system, msg.idem_key, msg.sender, protocol.pack(list(msg.to)),
         msg.thread, msg.priority, msg.body, now),
    )
    conn.executemany(
        "INSERT INTO recipient (message_id, address, status, updated_at) VALUES (?, ?, 'queued', ?)",
        [(msg.id, address, now) for address in msg.to],
    )
    lane = URGENT if msg.priority == "urgent" else NORMAL
    dests = dict.fromkeys(protocol.domain_of(a) for a in msg.to)
    conn.executemany(
        "INSERT INTO outbox (domain, message_id, dest, lane) VALUES (?, ?, ?, ?)",
        [(msg.domain, msg.id, dest, lane) for dest in dests],
    )
    return msg.id, True


def next_batch(conn: sqlite3.Connection, domain: str, limit: int) -> list[tuple[int, Envelope]]:
    """The next envelopes to send, urgent first, each lane in submission order."""
    rows = conn.execute(
        """SELECT o.seq, o.dest, m.id, m.sender, m.recipients, m.thread, m.priority, m.body, m.accepted_at
           FROM outbox o JOIN message m ON m.id = o.message_id
           WHERE o.domain = ? ORDER BY o.lane DESC, o.seq LIMIT ?""",
        (domain, limit),
    ).fetchall()
    batch = []
    for seq, dest, ident, sender, recipients, thread, priority, body, accepted_at in rows:
        to = tuple(protocol.unpack(recipients, "stored recipients"))
        rcpt = tuple(a for a in to if protocol.domain_of(a) == dest)
        batch.append((seq, Envelope(ident, sender, to, rcpt, body, thread, priority, accepted_at)))
    return batch


def apply_outcomes(conn: sqlite3.Connection, results: Iterable[tuple[int, Envelope, Outcome]]) -> None:
    """The hub answered a transaction: each envelope leaves the outbox."""
    for seq, envelope, outcome in results:
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        if outcome.accepted:
            _advance(conn, envelope.id, envelope.rcpt, "sent")
        else:
            _advance(conn, envelope.id, envelope.rcpt, "failed", outcome.reason)


def take_inbound(
    conn: sqlite3.Connection,
    domain: str,
    items: list[InboxItem],
    systems_serving: Callable[[str], Iterable[str]],
) -> tuple[list[Failure], set[str]]:
    """Commit what the hub sent; return the failures to report in the ack
    and the local systems that have new events.

    A message already taken (the hub resent it after a lost ack) creates no
    new event, but its failures are reported again: the ack is rebuilt the
    same way every time.
    """
    now = time.time()
    failures: list[Failure] = []
    woken: set[str] = set()
    for item in items:
        if item.receipt is not None:
            r = item.receipt
            _advance(conn, r.id, r.rcpt, r.status, r.reason)
            continue
        env = item.envelope
        assert env is not None
        if env.dest != domain:
            failures.append(Failure(item.seq, env.rcpt, "misrouted"))
            continue
        served = {a: sorted(systems_serving(a)) for a in env.rcpt}
        unknown = tuple(a for a, systems in served.items() if not systems)
        if unknown:
            failures.append(Failure(item.seq, unknown, protocol.UNKNOWN_RECIPIENT))
        systems = sorted({s for found in served.values() for s in found})
        if not systems:
            continue
        cursor = conn.execute(
            "INSERT OR IGNORE INTO inbound (domain, origin, id, sender, recipients, thread, priority, body, sent_at,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (domain, env.origin, env.id, env.sender, protocol.pack(list(env.to)), env.thread, env.priority,
             env.body, env.sent_at, now),
        )
        if cursor.rowcount:
            conn.executemany(
                "INSERT INTO event (system, inbound) VALUES (?, ?)",
                [(system, cursor.lastrowid) for system in systems],
            )
            woken.update(systems)
    return failures, woken


def _advance(conn: sqlite3.Connection, ident: str, rcpt: Iterable[str], status: str, reason: str | None = None) -> None:
    before = _ADVANCES_FROM[status]
    placeholders = ",".join("?" * len(before))
    conn.executemany(
        f"UPDATE recipient SET status = ?, reason = ?, updated_at = ?"
        f" WHERE message_id = ? AND address = ? AND status IN ({placeholders})",
        [(status, reason, time.time(), ident, address, *before) for address in rcpt],
    )


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


_PROGRESS = ("queued", "sent", "failed", "delivered")


def overall_status(statuses: Iterable[str]) -> str:
    """The least advanced recipient's status; a failure outranks a delivery."""
    return min(statuses, key=_PROGRESS.index, default="queued")


def events(conn: sqlite3.Connection, system: str, after: int, limit: int) -> list[dict]:
    rows = conn.execute(
        """SELECT e.cursor, i.id, i.origin, i.sender, i.recipients, i.body, i.thread, i.priority, i.sent_at
           FROM event e JOIN inbound i ON i.rowid = e.inbound
           WHERE e.system = ? AND e.cursor > ? ORDER BY e.cursor LIMIT ?""",
        (system, after, limit),
    ).fetchall()
    return [
        {
            "cursor": cursor,
            "type": "message",
            "message": {
                "id": ident,
                "from": sender,
                "to": protocol.unpack(recipients, "stored recipients"),
                "body": body,
                "thread": thread,
                "priority": priority,
                "sent_at": _iso(sent_at),
                "origin": {"domain": origin},
            },
        }
        for cursor, ident, origin, sender, recipients, body, thread, priority, sent_at in rows
    ]


def outbox_depth(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT lane, count(*) FROM outbox GROUP BY lane").fetchall()
    depth = {"urgent": 0, "normal": 0}
    for lane, count in rows:
        depth["urgent" if lane == URGENT else "normal"] = count
    return depth


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"
