"""The audit trail: metadata of every action, hash-chained, verifiable."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Space

from relay.store import audit
from relay.store.engine import connect, migrate

NOW = 1_700_000_000.0


@pytest.fixture
def conn(tmp_path: Path):
    db = connect(tmp_path / "audit.db")
    migrate(db, [audit.MIGRATION], "audit")
    yield db
    db.close()


def test_the_chain_verifies_and_finds_tampering(conn: sqlite3.Connection) -> None:
    for n in range(5):
        audit.record(conn, "system:messenger", "accepted", f"msg-{n}", "local", "queued", now=NOW)
    assert audit.verify(conn) == (5, None)
    conn.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3")
    checked, problem = audit.verify(conn)
    assert checked == 2 and problem.startswith("entry 3 (accepted")
    conn.execute("UPDATE audit SET outcome = 'queued' WHERE seq = 3")
    conn.execute("DELETE FROM audit WHERE seq = 4")
    assert audit.verify(conn) == (3, "entries 4 to 4 are missing")


def test_pruning_keeps_the_rest_verifiable(conn: sqlite3.Connection) -> None:
    for n, moment in enumerate([1000.0, 1001.0, 5000.0, 5001.0]):
        audit.record(conn, "relay", "sent", f"msg-{n}", "hub", "accepted", now=moment)
    assert audit.prune(conn, now=5000.0, retention=1000.0) == 2
    assert conn.execute("SELECT seq FROM audit_anchor").fetchone() == (2,)
    assert audit.verify(conn) == (2, None)
    audit.record(conn, "relay", "sent", "msg-9", "hub", "accepted", now=NOW)
    assert audit.verify(conn) == (3, None)
    conn.execute("DELETE FROM audit WHERE seq = 3")  # deleting the oldest kept entry is seen too
    assert audit.verify(conn)[1] == "entries 3 to 3 are missing"


def test_a_batch_chains_like_single_entries_and_a_rolled_back_unit_leaves_no_gap(conn: sqlite3.Connection) -> None:
    audit.record(conn, "relay", "sent", "msg-0", "hub", "accepted", now=NOW)
    audit.record_many(conn, [("relay", "sent", f"msg-{n}", "hub", "accepted") for n in range(1, 4)], now=NOW)
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT unit")
    audit.record_many(conn, [("hub", "received", "msg-x", "b", None), ("hub", "received", "msg-y", "b", None)], now=NOW)
    conn.execute("ROLLBACK TO unit")
    conn.execute("RELEASE unit")
    audit.record_many(conn, [], now=NOW)
    audit.record(conn, "admin", "reload", None, None, "applied", now=NOW)
    conn.execute("COMMIT")
    assert [row[0] for row in conn.execute("SELECT seq FROM audit ORDER BY seq")] == [1, 2, 3, 4, 5]
    assert audit.verify(conn) == (5, None)
    conn.execute("UPDATE audit SET message_id = 'msg-9' WHERE seq = 2")  # inside a batch: found too
    assert audit.verify(conn)[1].startswith("entry 2 (sent")


async def test_a_message_leaves_metadata_only_entries_at_every_hop(space: Space) -> None:
    body = "Compte rendu opératoire confidentiel"
    ident = await space.send(space.a, ["bob@clinique-sud.test"], body)
    await space.events(space.b, 1)
    await space.wait_status(space.a, ident, "delivered")
    async with space.a.client() as client:  # a refused write is recorded too
        await client.post("/v1/messages", json={"from": "mallory@chu-nord.test", "to": ["bob@clinique-sud.test"],
                                                "body": "x"})
    actions = {}
    for name in ("state-relay-a/relay.db", "state-hub/hub.db", "state-relay-b/relay.db"):
        path = space.directory / name
        reader = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        rows = reader.execute("SELECT actor, action, message_id, peer, outcome FROM audit").fetchall()
        assert audit.verify(reader)[1] is None
        reader.close()
        assert all(body not in " ".join(map(str, row)) for row in rows)
        actions[name.split("/")[0]] = [(action, message_id) for _, action, message_id, _, _ in rows]
        result = subprocess.run([sys.executable, "-m", "relay", "audit-verify", "--db", str(path)],
                                capture_output=True, check=False, text=True, timeout=30)
        assert result.returncode == 0 and "intact" in result.stdout
    assert ("accepted", ident) in actions["state-relay-a"] and ("sent", ident) in actions["state-relay-a"]
    assert ("receipt delivered", ident) in actions["state-relay-a"]
    assert ("refused", None) in actions["state-relay-a"]
    assert ("accepted", ident) in actions["state-hub"] and ("delivered", ident) in actions["state-hub"]
    assert ("received", ident) in actions["state-relay-b"]


@pytest.mark.parametrize("fields", [
    (1, 1764150000.123456, "system:messenger", "accepted", "0005d1e2a3b4c5d6e7f8a9b0c1d2e3f4", "local", "queued"),
    (2**40, 0.1, "relay:chu-nord.test", "refused", None, None, None),
    (7, 1e22, "admin", "queue purge", 'quote " and \\ back', "tab\tnew\nline\x00", "é, ü, 漢字, \u2028, 🩺"),
])
def test_the_hash_is_over_the_json_of_the_fields_as_it_always_was(fields) -> None:
    # Entries written before _chain spelt the JSON out must still verify.
    expected = hashlib.sha256(("f" * 64 + json.dumps(fields, separators=(",", ":"))).encode()).hexdigest()
    assert audit._chain("f" * 64, *fields) == expected
