"""A reload is all or nothing: when its last step fails, every part of the
relay still runs the configuration in force, and status says so.

The last step that can fail is recording the reload in the audit trail;
here the store refuses every write (``PRAGMA query_only`` on its writer
connection: what a disk remounted read-only does), in a relay over real
TLS on loopback with a real SQLite file.  The new configuration changes
something of every part, so that a part swapped too early shows."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import STEP, Space

from relay.config.model import load_relay_config
from relay.pki import authority
from relay.runtime import daemon
from relay.runtime.apps import RelayApp
from relay.store import engine

REAL_CONNECT = engine.connect


class Writers:
    """The store connections opened for one state directory (the writer's)."""

    def __init__(self, state: Path) -> None:
        self.state = state.resolve()
        self.connections: list[sqlite3.Connection] = []

    def connect(self, path: Path, ring=None) -> sqlite3.Connection:
        conn = REAL_CONNECT(path, ring)
        if path.parent.resolve() == self.state:
            self.connections.append(conn)
        return conn

    def read_only(self, on: bool) -> None:
        for conn in self.connections:
            conn.execute(f"PRAGMA query_only = {int(on)}")


@pytest.fixture
def apps(monkeypatch) -> list[RelayApp]:
    """The RelayApp of each relay the test starts."""
    built: list[RelayApp] = []

    class Recorded(RelayApp):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(daemon, "RelayApp", Recorded)
    return built


async def test_a_reload_whose_last_step_fails_changes_no_part(stopped_space: Space, apps, monkeypatch) -> None:
    space = stopped_space
    path = space.a.config.path
    pki_dir = space.directory / "pki"
    ca, ca_key = pki_dir / "ca.pem", pki_dir / "ca.key"
    first = authority.issue_certificate(ca, ca_key, space.directory / "local-1", dns_names=["relay-a.local"],
                                        ip_addresses=["127.0.0.1"], role="local")
    renewed = authority.issue_certificate(ca, ca_key, space.directory / "local-2", dns_names=["relay-a.local"],
                                          ip_addresses=["127.0.0.1"], role="local")
    secret = space.directory / "lab.secret"
    secret.write_text("a webhook signing key of the lab\n")
    secret.chmod(0o600)
    text = path.read_text()
    path.write_text(text.replace("[local_api]\n", f'[local_api]\ntls_cert_file = "{first[0]}"\n'
                                                  f'tls_key_file = "{first[1]}"\n'))
    space.a.config = replace(load_relay_config(path), state_dir=space.a.config.state_dir)
    writers = Writers(space.a.config.state_dir)
    monkeypatch.setattr(engine, "connect", writers.connect)
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    (app,) = apps
    old = app.reloader.config
    level = logging.getLogger().level
    tls = app.api_server.tls
    assert tls is not None and old.local_api.tls_cert_file == first[0]

    hub_url = old.uplink.hub_url
    path.write_text(
        text.replace('[relay]\n', '[relay]\nlog_level = "error"\nmessage_ttl = "2d"\n')
        .replace("[uplink]\n", "[uplink]\nbackoff_max = 3\n")
        .replace(text[text.index("hub_url"):text.index("\n", text.index("hub_url"))], f'hub_url = "{hub_url}"')
        .replace("[local_api]\n", f'[local_api]\ntls_cert_file = "{renewed[0]}"\ntls_key_file = "{renewed[1]}"\n')
        + '\nrate_limit = 5\n\n[[local_system]]\nname = "lab"\ntoken_sha256 = "' + "ab" * 32 + '"\n'
        'users = ["lab@chu-nord.test"]\nwebhook_url = "http://127.0.0.1:9/hook"\n'
        f'webhook_secret_file = "{secret}"\n')

    writers.read_only(True)
    try:
        with trio.fail_after(STEP):
            applied = await app.reloader.reload("test")
    finally:
        writers.read_only(False)

    assert applied is False
    assert "audit trail" in " ".join(app.reloader.last["errors"])
    # Every part still on the configuration in force:
    assert app.reloader.config is old
    assert app.uplink.config is old
    assert app.api.config is old
    assert app.housekeeping.delivery is old.delivery
    assert app.webhooks.pushers == []
    assert app.api_server.tls is tls
    assert logging.getLogger().level == level
    status = await space.daemon_status(space.a)
    assert status["reload"]["ok"] is False and status["reload"]["errors"] == app.reloader.last["errors"]
    assert "the last reload failed; the previous configuration is in force" in status["warnings"]

    # The same file, the store writable again: every part takes it (the
    # assertions above were able to fail).
    with trio.fail_after(STEP):
        assert await app.reloader.reload("test again") is True
    new = app.reloader.config
    assert new is not old and app.uplink.config is new and app.api.config is new
    assert new.uplink.backoff_max == 3 and app.housekeeping.delivery.message_ttl == 2 * 86400
    assert [p.system.name for p in app.webhooks.pushers] == ["lab"]
    assert app.api_server.tls is not tls
    assert logging.getLogger().level == logging.ERROR
    logging.getLogger().setLevel(level)


async def test_a_reload_refuses_a_key_others_can_read(stopped_space: Space, apps) -> None:
    """What stops the start stops a reload too: a key file readable by
    others may have leaked (it was accepted by a reload before)."""
    space = stopped_space
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    (app,) = apps
    old = app.reloader.config
    key = old.uplink.key_file
    key.chmod(0o644)
    try:
        with trio.fail_after(STEP):
            assert await app.reloader.reload("test") is False
    finally:
        key.chmod(0o600)
    assert app.reloader.config is old
    assert any(f"chmod 600 {key}" in problem for problem in app.reloader.last["errors"])
