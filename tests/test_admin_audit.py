"""Admin actions that change a store's state are in its audit trail, the
ones done with the daemon stopped (``rotate-key``, ``restore``) too; the
trail still verifies after them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import Space

from relay.cli.main import main
from relay.net.admin_socket import StateLock
from relay.store import audit, relay_queue, sealing
from relay.store.engine import connect, migrate


def _trail(db: Path) -> tuple[list[tuple[str, str, str]], str | None]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT actor, action, outcome FROM audit ORDER BY seq").fetchall()
        return rows, audit.verify(conn)[1]
    finally:
        conn.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A relay's state directory: its store (one entry in the trail) and key ring."""
    directory = tmp_path / "state"
    conn = connect(directory / "relay.db")
    migrate(conn, relay_queue.MIGRATIONS, "relay")
    audit.record(conn, "relay", "started", now=1000.0)
    conn.close()
    sealing.KeyRing.load_or_create(directory / sealing.KEY_FILE)
    return directory


def test_rotate_key_is_audited(state: Path) -> None:
    assert main(["rotate-key", "--state-dir", str(state)]) == 0
    assert sealing.KeyRing.load(state / sealing.KEY_FILE).current == 2
    rows, problem = _trail(state / "relay.db")
    assert rows[-1] == ("admin", "rotate-key", "key 2 added") and problem is None


def test_rotate_key_waits_for_the_daemon_to_stop(state: Path, capsys: pytest.CaptureFixture) -> None:
    with StateLock(state) as daemon:
        daemon.acquire("eimis-relay run")
        assert main(["rotate-key", "--state-dir", str(state)]) == 1
    assert "stop it first" in capsys.readouterr().err
    assert sealing.KeyRing.load(state / sealing.KEY_FILE).current == 1  # nothing added, nothing unaudited
    assert _trail(state / "relay.db")[0][-1][1] == "started"


async def test_restore_is_audited(stopped_space: Space, tmp_path: Path) -> None:
    space = stopped_space
    await space.start_relay(space.a, wait_connected=False)
    await space.stop_relay(space.a)
    config = str(space.a.config.path)
    copy = tmp_path / "backup.db"
    assert main(["backup", str(copy), "--config", config]) == 0
    assert main(["restore", str(copy), "--config", config]) == 0
    rows, problem = _trail(space.a.config.state_dir / "relay.db")
    assert rows[-1][:2] == ("admin", "restore") and rows[-1][2] == f"from {copy}" and problem is None
