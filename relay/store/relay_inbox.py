"""The relay's incoming side: what the hub brings, and what local systems read.

Units of work for `Store.run` over the tables `relay_store` creates
(inbound, event, receipt_out, webhook).  Events are what
``GET /v1/events`` and the webhooks deliver: a ``message`` for a system's
users, or a notice (``delayed``, ``failed``) about a message it sent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable

from relay.core import protocol
from relay.core.protocol import Failure, InboxItem
from relay.core.timeformat import iso
from relay.store import audit, sealing
from relay.store.relay_queue import advance, fail, message_id_of

log = logging.getLogger(__name__)


def take_inbound(
    conn: sqlite3.Connection,
    domain: str,
    items: list[InboxItem],
    systems_serving: Callable[[str], Iterable[str]],
    *,
    now: float,
) -> tuple[list[Failure], set[str]]:
    """Commit what the hub sent; return the failures to report in the ack
    and the local systems that have new events.

    A message already taken (the hub resent it after a lost ack, or its
    sender retried it: ``retry_of``) creates no new event for a system that
    has it, but its failures are reported again: the ack is rebuilt the
    same way every time.
    """
    failures: list[Failure] = []
    woken: set[str] = set()
    trail: list[audit.Entry] = []
    news = _News(conn, now)
    for item in items:
        if item.receipt is not None:
            r = item.receipt
            news.add(r, woken)
            trail.append(("hub", f"receipt {r.status}", r.id, ",".join(r.rcpt), r.reason))
            continue
        env = item.envelope
        assert env is not None
        if env.dest != domain:
            failures.append(Failure(item.seq, env.rcpt, protocol.MISROUTED))
            trail.append(("hub", "refused", env.id, env.origin, protocol.MISROUTED))
            continue
        served = {a: sorted(systems_serving(a)) for a in env.rcpt}
        unknown = tuple(a for a, systems in served.items() if not systems)
        if unknown:
            failures.append(Failure(item.seq, unknown, protocol.UNKNOWN_RECIPIENT))
        systems = sorted({s for found in served.values() for s in found})
        if not systems:
            continue
        ident = env.retry_of or env.id  # the message's id, whichever attempt brought it
        cursor = conn.execute(
            "INSERT OR IGNORE INTO inbound (domain, origin, origin_org, id, envelope_id, sender, recipients, thread,"
            " priority, body, sent_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, seal(?, ?), ?, ?)",
            (domain, env.origin, env.origin_org or None, ident, env.id, env.sender, protocol.pack(list(env.to)),
             env.thread, env.priority, env.body, ident, env.sent_at, now),
        )
        if cursor.rowcount:
            trail.append(("hub", "received", ident, env.origin, f"for {', '.join(systems)}"))
            rowid = cursor.lastrowid
        else:  # had already: only a system that has not got it yet (a retry for a recipient known since) gets it
            [(rowid,)] = conn.execute("SELECT rowid FROM inbound WHERE domain = ? AND origin = ? AND id = ?",
                                      (domain, env.origin, ident))
            had = {s for (s,) in conn.execute("SELECT system FROM event WHERE inbound = ? AND type = 'message'",
                                              (rowid,))}
            systems = [s for s in systems if s not in had]
            if env.retry_of and not systems:
                trail.append(("hub", "duplicate", ident, env.origin, f"retry {env.id} of a message already here"))
        if systems:
            conn.executemany(  # now, so that events keep the order of arrival with notices posted meanwhile
                "INSERT INTO event (system, type, inbound, created_at) VALUES (?, 'message', ?, ?)",
                [(system, rowid, now) for system in systems],
            )
            woken.update(systems)
    news.flush()
    audit.record_many(conn, trail, now=now)
    return failures, woken


class _News:
    """Receipts applied in arrival order, a run of the same status in one
    statement: a recipient's status only moves forward, but ``failed``
    after ``delivered`` is not the same as ``delivered`` after ``failed``."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._conn, self._now = conn, now
        self._status = ""
        self._moves: list[tuple[str, str]] = []

    def add(self, receipt: protocol.Receipt, notified: set[str]) -> None:
        if receipt.status != self._status:
            self.flush()
        ident = message_id_of(receipt.id)  # a retry's envelope id names its message
        if receipt.status == "failed":  # rare, and its sender gets a notice
            fail(self._conn, ident, receipt.rcpt, receipt.reason, notified, now=self._now)
            return
        self._status = receipt.status
        self._moves.extend((ident, address) for address in receipt.rcpt)

    def flush(self) -> None:
        if self._moves:
            advance(self._conn, self._moves, self._status, now=self._now)
        self._status, self._moves = "", []


def events(conn: sqlite3.Connection, system: str, after: int, limit: int) -> list[dict]:
    """A page of a system's events, in cursor order, as the API shows them.

    An event whose stored row cannot be read (a body that does not open: a
    damaged row, a key ring without its key) is shown as an ``unreadable``
    event naming the message, rather than stopping the system's events (and
    its webhook) at that cursor for good."""
    rows = conn.execute(
        """SELECT e.cursor, e.type, e.notice, i.id, i.origin, i.origin_org, i.sender, i.recipients,
                  i.body, i.thread, i.priority, i.sent_at
           FROM event e LEFT JOIN inbound i ON i.rowid = e.inbound
           WHERE e.system = ? AND e.cursor > ? ORDER BY e.cursor LIMIT ?""",
        (system, after, limit),
    ).fetchall()
    page = []
    for cursor, kind, notice, ident, origin, origin_org, sender, recipients, sealed, thread, priority, sent_at in rows:
        try:
            if kind != "message":
                page.append({"cursor": cursor, "type": kind, "notice": json.loads(notice)})
                continue
            message = {
                "id": ident,
                "from": sender,
                "to": protocol.unpack(recipients, "stored recipients"),
                "body": sealing.unseal(conn, sealed, ident),
                "thread": thread,
                "priority": priority,
                "sent_at": iso(sent_at),
                # Verified by the hub from the sending relay's certificate.
                "origin": {"domain": origin, "organisation": origin_org},
            }
        except (sealing.Unreadable, ValueError, TypeError) as exc:
            log.error("event %s of %s cannot be read (%s): shown as 'unreadable'", cursor, system,
                      exc.__class__.__name__)
            page.append({"cursor": cursor, "type": UNREADABLE_EVENT,
                         "notice": {"id": ident, "origin": {"domain": origin, "organisation": origin_org}}
                         if ident is not None else {}})
            continue
        page.append({"cursor": cursor, "type": "message", "message": message})
    return page


# The type of an event whose stored message cannot be read any more.
UNREADABLE_EVENT = "unreadable"


def mark_read(
    conn: sqlite3.Connection, domain: str, system: str, ident: str, serves: Callable[[str], bool], *, now: float
) -> bool | None:
    """A system reports that its user read a message it received.

    Returns None when this system never received that message, False when
    it was already marked read, True when a ``read`` receipt was queued for
    the sender (for the recipients this system serves).
    """
    rows = conn.execute(
        """SELECT e.cursor, e.read_at, i.origin, i.recipients, coalesce(i.envelope_id, i.id)
           FROM event e JOIN inbound i ON i.rowid = e.inbound
           WHERE e.system = ? AND e.type = 'message' AND i.id = ? AND i.domain = ?""",
        (system, ident, domain),
    ).fetchall()
    if not rows:
        return None
    cursor, read_at, origin, recipients, taken_as = rows[0]
    if read_at is not None:
        return False
    conn.execute("UPDATE event SET read_at = ? WHERE cursor = ?", (now, cursor))
    rcpt = [a for a in protocol.unpack(recipients, "stored recipients")
            if protocol.domain_of(a) == domain and serves(a)]
    # The receipt names the envelope taken: the id the hub knows as delivered here.
    conn.execute(
        "INSERT INTO receipt_out (domain, origin, id, rcpt, status) VALUES (?, ?, ?, ?, 'read')",
        (domain, origin, taken_as, protocol.pack(rcpt)),
    )
    audit.record(conn, f"system:{system}", "read", ident, origin, "receipt queued", now=now)
    return True


def prune(conn: sqlite3.Connection, now: float, retention: float) -> int:
    """Drop events older than ``retention`` seconds, read or not, and the
    bodies no event points to any more; return how many events went."""
    dropped = conn.execute("DELETE FROM event WHERE created_at < ?", (now - retention,)).rowcount
    if dropped:
        conn.execute("DELETE FROM inbound WHERE received_at < ? AND rowid NOT IN"
                     " (SELECT inbound FROM event WHERE inbound IS NOT NULL)", (now - retention,))
    return dropped


def webhook_position(conn: sqlite3.Connection, system: str) -> int:
    row = conn.execute("SELECT cursor FROM webhook WHERE system = ?", (system,)).fetchone()
    return row[0] if row else 0


def set_webhook_position(conn: sqlite3.Connection, system: str, cursor: int) -> None:
    conn.execute(
        "INSERT INTO webhook (system, cursor) VALUES (?, ?)"
        " ON CONFLICT (system) DO UPDATE SET cursor = excluded.cursor",
        (system, cursor),
    )
