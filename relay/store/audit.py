"""The audit trail: who did what to which message, when, with what outcome.

Theory of operation
-------------------
Every entry is metadata only -- never a body -- and is written by the
same unit of work, in the same transaction, as the action it records: an
action that committed is in the trail, one that rolled back is not.

Entries are hash-chained: each carries the SHA-256 of the previous entry's
hash and its own fields, so an edited, inserted or deleted entry breaks
the chain from there on, and `verify` says where.  Old entries leave after
the retention period (six months by default, the French norm for health
messaging); the anchor table keeps the hash of the last entry removed, so
the rest of the chain still verifies.
"""

from __future__ import annotations

import hashlib
import sqlite3
from json.encoder import encode_basestring_ascii as _quote  # json's own (C) string encoder
from pathlib import Path

from relay.core import timeformat
from relay.store.engine import connect

MIGRATION = [
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        message_id TEXT, peer TEXT, outcome TEXT, hash TEXT NOT NULL)""",
    "CREATE INDEX audit_by_time ON audit (at)",
    "CREATE TABLE audit_anchor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL)",
]

GENESIS = "0" * 64
RETENTION = 183 * 86400.0


Entry = tuple[str, str, str | None, str | None, str | None]  # actor, action, message id, peer, outcome


def record(
    conn: sqlite3.Connection,
    actor: str,
    action: str,
    message_id: str | None = None,
    peer: str | None = None,
    outcome: str | None = None,
    *,
    now: float,
) -> None:
    """Append one entry, made at ``now``; call it from the unit of work that does the action."""
    record_many(conn, [(actor, action, message_id, peer, outcome)], now=now)


def record_many(conn: sqlite3.Connection, entries: list[Entry], *, now: float) -> None:
    """Append entries in order: one read of the chain's end and one batched
    insert, so that a unit taking 500 envelopes pays for its trail once
    rather than three statements per entry."""
    if not entries:
        return
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone() or _anchor(conn)
    seq, previous = last[0] or 0, last[1]
    at = now
    rows = []
    for actor, action, message_id, peer, outcome in entries:
        seq += 1
        previous = _chain(previous, seq, at, actor, action, message_id, peer, outcome)
        rows.append((seq, at, actor, action, message_id, peer, outcome, previous))
    conn.executemany(
        "INSERT INTO audit (seq, at, actor, action, message_id, peer, outcome, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def record_offline(db: Path, actor: str, action: str, outcome: str, *, now: float) -> None:
    """Append one entry to the store ``db`` from a command that holds the
    state directory's lock (`relay.net.admin_socket.StateLock`), so that no
    daemon writes to it meanwhile: an admin action done with the daemon
    stopped (``rotate-key``, ``restore``) is in the trail like the others."""
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            record(conn, actor, action, None, None, outcome, now=now)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


def prune(conn: sqlite3.Connection, now: float, retention: float = RETENTION) -> int:
    """Drop entries older than ``retention``, keeping the chain verifiable."""
    last = conn.execute("SELECT seq, hash FROM audit WHERE at < ? ORDER BY seq DESC LIMIT 1",
                        (now - retention,)).fetchone()
    if last is None:
        return 0
    dropped = conn.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
    conn.execute("INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?, ?)"
                 " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash", last)
    return dropped


def verify(conn: sqlite3.Connection) -> tuple[int, str | None]:
    """Walk the chain: (entries checked, the first problem or None)."""
    expected_seq, previous = _anchor(conn)
    checked = 0
    for seq, at, actor, action, message_id, peer, outcome, digest in conn.execute(
        "SELECT seq, at, actor, action, message_id, peer, outcome, hash FROM audit ORDER BY seq"
    ):
        if expected_seq is not None and seq != expected_seq + 1:
            return checked, f"entries {expected_seq + 1} to {seq - 1} are missing"
        if _chain(previous, seq, at, actor, action, message_id, peer, outcome) != digest:
            return checked, f"entry {seq} ({action} at {timeformat.second(at)}) " \
                            "was altered, or an entry before it was"
        expected_seq, previous, checked = seq, digest, checked + 1
    return checked, None


def _anchor(conn: sqlite3.Connection) -> tuple[int | None, str]:
    row = conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
    return (row[0], row[1]) if row else (None, GENESIS)


def _chain(previous: str, seq: int, at: float, actor: str, action: str, message_id: str | None, peer: str | None,
           outcome: str | None) -> str:
    """SHA-256 of the previous hash and the entry's fields as the JSON array
    ``json.dumps(fields, separators=(",", ":"))`` writes (the chain's
    definition since its first entry), spelt out here: at thousands of
    entries a second, json's general machinery was most of the trail's cost."""
    fields = (f"[{seq},{float.__repr__(at)},{_quote(actor)},{_quote(action)},{_text(message_id)},{_text(peer)},"
              f"{_text(outcome)}]")
    return hashlib.sha256((previous + fields).encode()).hexdigest()


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)
