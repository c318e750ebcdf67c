"""The hub's durable state and the units of work that change it.

Each function here is a unit for `Store.run`: synchronous, given the
connection, running inside the writer thread's group transaction.

Tables
  domain        the registry of relays' domains (configured or learnt)
  seen          (origin, message id, destination) already queued: the
                per-envelope duplicate filter that makes retries harmless
  txn           the answer to each transaction, so a replayed transaction
                gets the same answer and changes nothing
                (both kept for the replay window: `prune_replays`)
  queue         store-and-forward items per destination domain, in two
                lanes (1 = urgent and receipts, 0 = normal); an item leaves
                only when the destination relay acknowledges its position
"""

from __future__ import annotations

import sqlite3

from relay.core import protocol
from relay.core.priority import NORMAL, URGENT, lane_of
from relay.core.protocol import Envelope, Failure, Outcome, Receipt
from relay.store import audit, sealing

MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE domain (name TEXT PRIMARY KEY, added_at REAL NOT NULL, learnt INTEGER NOT NULL)",
        """CREATE TABLE seen (
            origin TEXT NOT NULL, id TEXT NOT NULL, dest TEXT NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (origin, id, dest)) WITHOUT ROWID""",
        """CREATE TABLE txn (
            origin TEXT NOT NULL, id TEXT NOT NULL, results BLOB NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (origin, id)) WITHOUT ROWID""",
        """CREATE TABLE queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL, lane INTEGER NOT NULL, kind TEXT NOT NULL,
            origin TEXT NOT NULL, payload BLOB NOT NULL)""",
        "CREATE INDEX queue_by_domain ON queue (domain, lane, seq)",
    ],
    [
        # Messages carry their time-to-live; the hub fails the expired ones.
        "ALTER TABLE queue ADD COLUMN expires_at REAL",
        "ALTER TABLE queue ADD COLUMN sweep_at REAL",  # see protocol.sweep_time
        "CREATE INDEX queue_by_sweep ON queue (sweep_at) WHERE sweep_at IS NOT NULL",
        # Read receipts are taken only about messages the relay acknowledged.
        "ALTER TABLE seen ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0",
    ],
    audit.MIGRATION,
    [
        # The replay window: the filter and the answers are pruned by age.
        "CREATE INDEX seen_by_age ON seen (at)",
        "CREATE INDEX txn_by_age ON txn (at)",
    ],
]

# Positions looked up per statement: well under SQLite's limit on bound parameters.
ACK_CHUNK = 500
# The largest payload queued: with its inbox frame (`routes.inbox_frame`:
# a map header, the position and the kind, under 64 bytes) it stays within
# `protocol.MAX_ITEM_BYTES`, so the destination relay can always decode it.
MAX_PAYLOAD = protocol.MAX_ITEM_BYTES - 64
# How far ahead of the hub's clock an envelope's sent_at may be.  It bounds
# how long a duplicate-filter entry must outlive its envelope's sent_at, so
# that pruning by the hub's clock stays safe (`prune_replays`).
CLOCK_AHEAD = 86400.0
# The reference relay's window (`HubConfig.replay_window`), for callers
# that do not say.
REPLAY_WINDOW = 30 * 86400.0
# Rows one `prune_replays` unit deletes per table: the writer is not held
# for long; the sweep runs units until the backlog is gone.
PRUNE_BATCH = 5000


def register_domains(conn: sqlite3.Connection, names: frozenset[str], learnt: bool, *, now: float) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO domain (name, added_at, learnt) VALUES (?, ?, ?)",
        [(name, now, int(learnt)) for name in sorted(names)],
    )


def known_domains(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM domain")}


def accept_transaction(
    conn: sqlite3.Connection, origin: str, txn_id: str, raw_envelopes: list[object], origin_org: str = "", *,
    now: float, replay_window: float = REPLAY_WINDOW,
) -> tuple[list[Outcome], set[str]]:
    """Queue a relay's envelopes; return the per-envelope answers and the
    destination domains that got something new (to wake their streams).

    A transaction seen before returns its stored answer and queues nothing.
    An envelope sent (``sent_at``) more than ``replay_window`` ago is
    refused as expired: its duplicate-filter entry may be pruned already.
    """
    row = conn.execute("SELECT results FROM txn WHERE origin = ? AND id = ?", (origin, txn_id)).fetchone()
    if row is not None:
        try:
            stored = protocol.unpack(row[0], "stored results")
            return [Outcome.from_wire(o) for o in stored], set()
        except (protocol.ProtocolViolation, TypeError):
            # A damaged answer must not refuse the replay forever: answer it
            # afresh (the duplicate filter makes that harmless) and keep the new one.
            conn.execute("DELETE FROM txn WHERE origin = ? AND id = ?", (origin, txn_id))
    known = known_domains(conn)
    outcomes: list[Outcome] = []
    woken: set[str] = set()
    trail: list[audit.Entry] = []
    for raw in raw_envelopes:
        outcome, dest = _accept_one(conn, origin, origin_org, raw, known, now, replay_window)
        outcomes.append(outcome)
        # Only a well-formed id goes into the shared audit trail (a refused
        # envelope's may be anything up to the body limit).
        ident = raw.get("id") if isinstance(raw, dict) and protocol.is_token(raw.get("id")) else None
        trail.append((f"relay:{origin}", "accepted" if outcome.accepted else "refused", ident, dest,
                      outcome.reason or "queued"))
        if dest:
            woken.add(dest)
    audit.record_many(conn, trail, now=now)
    conn.execute(
        "INSERT INTO txn (origin, id, results, at) VALUES (?, ?, ?, ?)",
        (origin, txn_id, protocol.pack([o.to_wire() for o in outcomes]), now),
    )
    return outcomes, woken


def _accept_one(
    conn: sqlite3.Connection, origin: str, origin_org: str, raw: object, known: set[str], now: float,
    replay_window: float,
) -> tuple[Outcome, str | None]:
    try:
        envelope = Envelope.from_wire(raw)
    except protocol.ProtocolViolation as exc:
        return Outcome(False, protocol.INVALID_ENVELOPE, str(exc)), None
    if protocol.domain_of(envelope.sender) != origin:
        return (
            Outcome(False, protocol.SENDER_NOT_AUTHENTICATED, f"sender is not of {origin}, the connection's domain"),
            None,
        )
    dest = envelope.dest
    if dest not in known:
        return Outcome(False, protocol.UNKNOWN_DOMAIN, f"no relay is registered for {dest}"), None
    stamped = Envelope(**{**envelope.__dict__, "origin": origin, "origin_org": origin_org})
    payload = protocol.pack(stamped.to_wire())
    if len(payload) > MAX_PAYLOAD:  # not within the field limits; checked so that changing them cannot wedge a relay
        return Outcome(False, protocol.INVALID_ENVELOPE, f"envelope: larger than {MAX_PAYLOAD} bytes"), None
    if envelope.sent_at > now + CLOCK_AHEAD:
        return Outcome(False, protocol.INVALID_ENVELOPE,
                       "envelope.sent_at is more than a day ahead of the hub's clock"), None
    if envelope.sent_at < now - replay_window:
        return Outcome(False, protocol.EXPIRED,
                       f"sent more than the hub's replay window ({replay_window / 86400:g} days) ago"), None
    expired = envelope.expires_at is not None and envelope.expires_at < now
    if expired:
        seen = conn.execute("SELECT 1 FROM seen WHERE origin = ? AND id = ? AND dest = ?",
                            (origin, envelope.id, dest)).fetchone()
        if seen is None:
            return Outcome(False, protocol.EXPIRED,
                           "the message's time-to-live ran out before it reached the hub"), None
        return Outcome(True), None  # a replay of what was accepted before it expired
    if not conn.execute("INSERT OR IGNORE INTO seen (origin, id, dest, at) VALUES (?, ?, ?, ?)",
                        (origin, envelope.id, dest, now)).rowcount:
        # A replay of what was accepted before: queued once is enough.  If it
        # was delivered, its relay may have lost the receipt (a store restored
        # from a backup older than it): say it again, or it stays "sent".
        delivered = conn.execute("SELECT delivered FROM seen WHERE origin = ? AND id = ? AND dest = ?",
                                 (origin, envelope.id, dest)).fetchone()[0]
        if delivered:
            _queue_receipt(conn, origin, Receipt(envelope.id, envelope.rcpt, "delivered"))
            return Outcome(True), origin
        return Outcome(True), None
    expires_at = envelope.expires_at
    sweep_at = None if expires_at is None else protocol.sweep_time(envelope.sent_at, expires_at)
    conn.execute(
        "INSERT INTO queue (domain, lane, kind, origin, payload, expires_at, sweep_at)"
        " VALUES (?, ?, 'message', ?, seal(?, ?), ?, ?)",
        (dest, lane_of(envelope.priority), origin, payload, dest, expires_at, sweep_at),
    )
    return Outcome(True), dest


def accept_receipts(
    conn: sqlite3.Connection, domain: str, raw_receipts: list[object], *, now: float
) -> tuple[list[Outcome], set[str]]:
    """Route ``read`` receipts from the relay of ``domain`` to each message's
    origin; refuse any receipt about a message this domain never received.
    Returns the answers and the origin domains to wake."""
    outcomes: list[Outcome] = []
    woken: set[str] = set()
    for raw in raw_receipts:
        try:
            receipt = Receipt.from_wire(raw)
        except protocol.ProtocolViolation as exc:
            outcomes.append(Outcome(False, protocol.INVALID_ENVELOPE, str(exc)))
            continue
        received = conn.execute(
            "SELECT 1 FROM seen WHERE origin = ? AND id = ? AND dest = ? AND delivered = 1",
            (receipt.origin, receipt.id, domain),
        ).fetchone()
        if (
            receipt.status != "read"
            or received is None
            or any(protocol.domain_of(a) != domain for a in receipt.rcpt)
        ):
            outcomes.append(Outcome(False, protocol.UNKNOWN_MESSAGE,
                                    f"{domain} received no message {receipt.id} from {receipt.origin or '?'}"))
            audit.record(conn, f"relay:{domain}", "refused", receipt.id, receipt.origin, protocol.UNKNOWN_MESSAGE,
                         now=now)
            continue
        _queue_receipt(conn, receipt.origin, Receipt(receipt.id, receipt.rcpt, "read"))
        audit.record(conn, f"relay:{domain}", "read", receipt.id, receipt.origin, "routed", now=now)
        outcomes.append(Outcome(True))
        woken.add(receipt.origin)
    return outcomes, woken


def expire(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    """Fail the queued messages past their time-to-live and its grace (no
    inbox stream sends them once expired, and one sent just before has been
    acknowledged by then): each origin gets a ``failed`` receipt with reason
    ``expired``.  Returns the domains to wake, with how many of their
    messages expired."""
    rows = conn.execute(
        "SELECT seq, origin, domain, payload FROM queue WHERE kind = 'message' AND sweep_at < ?", (now,)
    ).fetchall()
    woken: dict[str, int] = {}
    for seq, origin, domain, sealed in rows:
        conn.execute("DELETE FROM queue WHERE seq = ?", (seq,))
        envelope = _open_envelope(conn, sealed, domain)
        if envelope is None:  # unreadable: nothing to tell anyone, but it must not stop the sweep
            audit.record(conn, "hub", "dropped", None, domain, f"queue item {seq} cannot be opened", now=now)
            continue
        _queue_receipt(conn, origin, Receipt(envelope.id, envelope.rcpt, "failed", protocol.EXPIRED))
        audit.record(conn, "hub", "expired", envelope.id, origin, "failed", now=now)
        woken[origin] = woken.get(origin, 0) + 1
    return woken


def prune_replays(conn: sqlite3.Connection, now: float, replay_window: float,
                  limit: int = PRUNE_BATCH) -> dict[str, int]:
    """Forget transaction answers and duplicate-filter entries recorded
    more than ``replay_window`` + `CLOCK_AHEAD` ago, at most ``limit`` rows
    of each table; return how many of each went.

    Safe: an entry was recorded at hub time ``at`` for an envelope whose
    ``sent_at`` is at most ``at`` + `CLOCK_AHEAD` (`_accept_one` refuses
    the others), so once the entry is pruned the envelope's ``sent_at`` is
    older than ``now`` - ``replay_window``, and a replay of it is refused as
    expired rather than queued a second time.  A replayed transaction whose
    answer is pruned is answered afresh: each envelope ``expired``."""
    cutoff = now - replay_window - CLOCK_AHEAD
    seen = conn.execute(
        "DELETE FROM seen WHERE (origin, id, dest) IN"
        " (SELECT origin, id, dest FROM seen WHERE at < ? ORDER BY at LIMIT ?)", (cutoff, limit)).rowcount
    txn = conn.execute(
        "DELETE FROM txn WHERE (origin, id) IN (SELECT origin, id FROM txn WHERE at < ? ORDER BY at LIMIT ?)",
        (cutoff, limit)).rowcount
    return {"seen": seen, "txn": txn}


def _open(conn: sqlite3.Connection, sealed: object, domain: str) -> bytes | None:
    """A queue item's payload, or None when it cannot be opened (see `relay.store.sealing`)."""
    try:
        return sealing.unseal(conn, sealed, domain, bytes)
    except sealing.Unreadable:
        return None


def _open_item(conn: sqlite3.Connection, kind: str, sealed: object, domain: str) -> bytes | None:
    """A payload to send down, or None: a message that cannot be opened, or
    a receipt (not sealed) that does not decode, which the relay's inbox
    would refuse, dropping the stream, every time the hub sent it again."""
    payload = _open(conn, sealed, domain)
    if kind == "receipt" and payload is not None:
        try:
            Receipt.from_wire(protocol.unpack(payload, "queued receipt"))
        except protocol.ProtocolViolation:
            return None
    return payload


def _open_envelope(conn: sqlite3.Connection, sealed: object, domain: str) -> Envelope | None:
    payload = _open(conn, sealed, domain)
    try:
        return None if payload is None else Envelope.from_wire(protocol.unpack(payload, "queued envelope"))
    except protocol.ProtocolViolation:
        return None


def fetch_inbox(
    conn: sqlite3.Connection, domain: str, after: dict[int, int], limit: int, *, now: float
) -> list[tuple[int, int, str, bytes | None]]:
    """The next items for ``domain`` past what this stream already sent,
    urgent lane first, none already swept as expired: (seq, lane, kind,
    payload).  Read only: a payload that cannot be opened (see
    `relay.store.sealing`) comes back as None, for `drop_unreadable`.

    An item is still sent during its expiry grace: one whose first delivery
    was committed but not acknowledged then gets its ack, and its origin a
    ``delivered`` rather than an ``expired``."""
    rows: list[tuple[int, int, str, bytes | None]] = []
    for lane in (URGENT, NORMAL):  # one range scan of the (domain, lane, seq) index each
        rows += [(seq, lane, kind, _open_item(conn, kind, sealed, domain)) for seq, lane, kind, sealed in conn.execute(
            """SELECT seq, lane, kind, payload FROM queue
               WHERE domain = ? AND lane = ? AND seq > ? AND (sweep_at IS NULL OR sweep_at >= ?)
               ORDER BY seq LIMIT ?""",
            (domain, lane, after[lane], now, limit - len(rows)),
        )]
        if len(rows) >= limit:
            break
    return rows


def drop_unreadable(conn: sqlite3.Connection, domain: str, seqs: list[int], *, now: float) -> None:
    """Take out of ``domain``'s queue items whose payload cannot be opened:
    they would block it forever, and nobody can be told about them."""
    for seq in seqs:
        conn.execute("DELETE FROM queue WHERE seq = ? AND domain = ?", (seq, domain))
        audit.record(conn, "hub", "dropped", None, domain, f"queue item {seq} cannot be opened", now=now)


def apply_ack(
    conn: sqlite3.Connection, domain: str, seqs: list[int], failures: list[Failure], *, now: float
) -> set[str]:
    """The relay of ``domain`` has durably taken these positions: drop them
    and send a receipt to each message's origin.  Positions that are not in
    ``domain``'s queue (already acknowledged, or someone else's) are ignored.
    Returns the domains that got receipts.

    An ack covers hundreds of positions at full speed, so the work is done
    a statement per kind of change, not per position."""
    failed = {f.seq: f for f in failures}
    found: dict[int, tuple[str, str, bytes | None]] = {}
    for start in range(0, len(seqs), ACK_CHUNK):
        chunk = seqs[start:start + ACK_CHUNK]
        for seq, kind, origin, sealed in conn.execute(
            f"SELECT seq, kind, origin, payload FROM queue"
            f" WHERE domain = ? AND seq IN ({','.join('?' * len(chunk))})", (domain, *chunk),
        ):
            found[seq] = (kind, origin, _open(conn, sealed, domain) if kind == "message" else None)
    conn.executemany("DELETE FROM queue WHERE seq = ?", [(seq,) for seq in found])
    woken: set[str] = set()
    delivered: list[tuple[str, str, str]] = []
    receipts: list[tuple[str, Receipt]] = []
    trail: list[audit.Entry] = []
    for seq in dict.fromkeys(seqs):
        if seq not in found:
            continue
        kind, origin, payload = found[seq]
        if kind != "message" or payload is None:  # a receipt, or unreadable (see relay.sealing)
            continue
        # Written by this hub from a checked envelope: only its id and recipients are needed.
        try:
            stored = protocol.unpack(payload, "queued envelope")
            ident, rcpt = stored["id"], stored["rcpt"]
        except (protocol.ProtocolViolation, KeyError, TypeError):  # damaged: must not fail the whole ack
            audit.record(conn, "hub", "dropped", None, domain, f"queue item {seq} cannot be read", now=now)
            continue
        trail.append((f"relay:{domain}", "delivered", ident, origin, "acknowledged"))
        delivered.append((origin, ident, domain))
        failure = failed.get(seq)
        lost = tuple(a for a in rcpt if failure and a in failure.rcpt)
        taken = tuple(a for a in rcpt if a not in lost)
        if taken:
            receipts.append((origin, Receipt(ident, taken, "delivered")))
        if lost:
            assert failure is not None  # lost is empty without one
            receipts.append((origin, Receipt(ident, lost, "failed", failure.reason)))
        woken.add(origin)
    conn.executemany("UPDATE seen SET delivered = 1 WHERE origin = ? AND id = ? AND dest = ?", delivered)
    _queue_receipts(conn, receipts)
    audit.record_many(conn, trail, now=now)
    return woken


def _queue_receipts(conn: sqlite3.Connection, receipts: list[tuple[str, Receipt]]) -> None:
    conn.executemany(
        "INSERT INTO queue (domain, lane, kind, origin, payload) VALUES (?, ?, 'receipt', '', ?)",
        [(origin, URGENT, protocol.pack(receipt.to_wire())) for origin, receipt in receipts],
    )


def _queue_receipt(conn: sqlite3.Connection, origin: str, receipt: Receipt) -> None:
    _queue_receipts(conn, [(origin, receipt)])


def backlog(conn: sqlite3.Connection) -> dict[str, dict[int, int]]:
    """Items waiting per domain and lane (read only: metrics and status);
    a scan of the (domain, lane, seq) index."""
    found: dict[str, dict[int, int]] = {}
    for domain, lane, count in conn.execute("SELECT domain, lane, count(*) FROM queue GROUP BY domain, lane"):
        found.setdefault(domain, {URGENT: 0, NORMAL: 0})[lane] = count
    return found
