"""The relay store's queries and units for the operations tools
(``eimis-relay queue``, ``status``, the metrics).

They run through the daemon's store like any unit (or, with no daemon, in
the command's own store, under the state directory's lock): the store
keeps one writer either way.  The tables are described in `relay_queue`.
"""

from __future__ import annotations

import sqlite3

from relay.core import protocol
from relay.core.priority import lane_of
from relay.core.timeformat import iso
from relay.store import audit, relay_queue, sealing

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
                        "system": system,
                        "status": relay_queue.overall_status(r["status"] for r in recipients.values()),
                        "recipients": {a: r["status"] for a, r in recipients.items()}})
    return listing


def queue_message(conn: sqlite3.Connection, ident: str, with_body: bool) -> dict | None:
    """Everything known about one message sent from here; its body only
    when asked, and only while the relay still holds it (``body_unreadable``
    when it holds one that cannot be opened)."""
    row = conn.execute(
        "SELECT sender, system, priority, thread, accepted_at, expires_at, body, delay_noticed, retries"
        " FROM message WHERE id = ?", (ident,)
    ).fetchone()
    if row is None:
        return None
    sender, system, priority, thread, accepted_at, expires_at, sealed, delay_noticed, retries = row
    try:
        body: str | None = sealing.unseal(conn, sealed, ident)
    except sealing.Unreadable:
        body = None
    waiting = [dest for (dest,) in conn.execute("SELECT dest FROM outbox WHERE message_id = ? ORDER BY seq", (ident,))]
    recipients = _recipients(conn, ident)
    kept = sealed not in ("", b"")
    document = {
        "id": ident, "from": sender, "system": system, "priority": priority, "thread": thread,
        "accepted_at": iso(accepted_at), "expires_at": iso(expires_at) if expires_at else None,
        "status": relay_queue.overall_status(r["status"] for r in recipients.values()), "recipients": recipients,
        "waiting_for_hub": waiting, "delay_noticed": bool(delay_noticed), "retries": retries,
        # The body is dropped once no recipient can need it (`drop_bodies`).
        "body_kept": kept, "body_unreadable": kept and body is None,
        "body_bytes": len(body.encode()) if body else 0,
    }
    if with_body:
        document["body"] = body if kept else None
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

    A message can go again while its body is kept: for the retry window
    after a failure (`drop_bodies`).  Each destination goes again as a new
    attempt, under a new envelope id (`envelope_id`): the hub drops an
    envelope id it has seen, and a retry must reach the destination; the
    envelope names the message it retries (``retry_of``), so a destination
    that did receive the first attempt (the hub failed it after a delivery
    it could not confirm) recognises it and shows it no second time.  The
    local system keeps seeing one message id and its statuses.  A retried
    message gets a fresh time-to-live, and may be noticed as delayed again.
    """
    if idents is None:
        idents = [ident for (ident,) in conn.execute(
            "SELECT DISTINCT message_id FROM recipient WHERE status = 'failed' ORDER BY message_id")]
    results: dict[str, str] = {}
    for ident in idents:
        row = conn.execute("SELECT priority, body, retries FROM message WHERE id = ?", (ident,)).fetchone()
        failed = [a for (a,) in conn.execute(
            "SELECT address FROM recipient WHERE message_id = ? AND status = 'failed'", (ident,))]
        waiting = {d for (d,) in conn.execute("SELECT dest FROM outbox WHERE message_id = ?", (ident,))}
        if row is None:
            results[ident] = "no such message"
        elif not failed:
            results[ident] = "no failed recipient"
        elif row[1] in ("", b""):
            results[ident] = "body no longer kept (the retry window after its failure is over): send it again"
        elif not _opens(conn, row[1], ident):
            results[ident] = "body cannot be opened (damaged, or sealed with a key this key ring has not got)"
        else:
            conn.executemany(
                "UPDATE recipient SET status = 'queued', reason = NULL, updated_at = ? WHERE message_id = ?"
                " AND address = ?", [(now, ident, a) for a in failed])
            lane, attempt = lane_of(row[0]), row[2] + 1
            dests = dict.fromkeys(protocol.domain_of(a) for a in failed)
            conn.executemany("INSERT INTO outbox (domain, message_id, dest, lane, attempt) SELECT domain, id, ?, ?, ?"
                             " FROM message WHERE id = ?",
                             [(dest, lane, attempt, ident) for dest in dests if dest not in waiting])
            conn.execute("UPDATE message SET expires_at = ?, sweep_at = ?, delay_noticed = 0, retries = ?"
                         " WHERE id = ?", (now + ttl, protocol.sweep_time(now, now + ttl), attempt, ident))
            results[ident] = RETRIED
        audit.record(conn, "admin", "queue retry", ident, None, results[ident], now=now)
    return results


def _opens(conn: sqlite3.Connection, sealed: object, ident: str) -> bool:
    try:
        sealing.unseal(conn, sealed, ident)
    except sealing.Unreadable:
        return False
    return True


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
    relay_queue.leave_outbox(conn, [seq for (seq,) in conn.execute("SELECT seq FROM outbox WHERE message_id = ?",
                                                         (ident,)).fetchall()])
    failed = relay_queue.fail(conn, ident, queued, PURGED, notified, now=now)
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
    return {"outbound": relay_queue.outbox_depth(conn), "oldest_queued_at": oldest, "recipients": by_status,
            "unread": unread, "webhook_backlog": pushed}
