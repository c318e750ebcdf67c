"""Shared fixtures: a whole demo space (hub + two relays) inside the test's
trio run, over real TLS on loopback, with real SQLite files.

Every port is chosen by the kernel (port 0); the hub keeps the port it got
first when a test stops and restarts it, so the relays find it again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from relay.appliance.local_api import LocalApi
from relay.cli import demo
from relay.config.model import HubConfig, RelayConfig, load_hub_config, load_relay_config
from relay.config.vocabulary import Address
from relay.net import admin_socket
from relay.net.wakeup import Signal, Signals
from relay.runtime.daemon import run_hub, run_relay
from relay.store import relay_queue
from relay.store.engine import connect, migrate

# Generous bound for anything that should take milliseconds on loopback.
STEP = 15.0


@dataclasses.dataclass
class RelayHandle:
    domain: str
    config: RelayConfig
    token: str
    users: list[str]
    url: str = ""

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=STEP, **kwargs
        )


class Space:
    """A hub and two relays from `eimis-relay demo --init-only` files."""

    def __init__(self, directory: Path, nursery: trio.Nursery) -> None:
        self.directory = directory
        self.nursery = nursery
        manifest = demo.init(directory)
        self.hub_config: HubConfig = replace(
            load_hub_config(directory / "hub.toml"), listen=Address("127.0.0.1", 0)
        )
        self._running: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.relays = [
            RelayHandle(r["domain"], load_relay_config(r["config"]), r["token"], r["users"])
            for r in manifest["relays"]
        ]
        self.a, self.b = self.relays

    async def start_hub(self) -> None:
        listeners = await self.nursery.start(self._run, run_hub, self.hub_config, "hub")
        port = listeners[0].socket.getsockname()[1]
        self.hub_config = replace(self.hub_config, listen=Address("127.0.0.1", port))
        for relay in self.relays:
            up = replace(relay.config.uplink, hub_port=port, hub_url=f"https://127.0.0.1:{port}")
            relay.config = replace(relay.config, uplink=up)

    async def stop_hub(self) -> None:
        await self._stop("hub")

    async def start_relay(self, relay: RelayHandle, *, wait_connected: bool = True) -> None:
        config = replace(relay.config, local_api=replace(relay.config.local_api, listen=Address("127.0.0.1", 0)))
        listeners = await self.nursery.start(self._run, run_relay, config, relay.domain)
        host, port = listeners[0].socket.getsockname()[:2]
        relay.url = f"http://{host}:{port}"
        if wait_connected:
            await self.wait_uplink(relay, "connected")

    async def stop_relay(self, relay: RelayHandle) -> None:
        await self._stop(relay.domain)

    async def start(self) -> Space:
        await self.start_hub()
        for relay in self.relays:
            await self.start_relay(relay)
        return self

    async def _run(self, fn, config, name, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run a daemon under a cancel scope the test can use to stop it, the
        way a crash would: no graceful shutdown."""
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._running[name] = (scope, done)
                await fn(config, task_status=task_status)
        finally:
            done.set()

    async def _stop(self, name: str) -> None:
        scope, done = self._running.pop(name)
        scope.cancel()
        with trio.fail_after(STEP):
            await done.wait()

    async def wait_uplink(self, relay: RelayHandle, state: str) -> None:
        async with httpx.AsyncClient(base_url=relay.url, timeout=STEP) as client:
            with trio.fail_after(STEP):
                while (await client.get("/healthz")).json()["uplink"] != state:
                    await trio.sleep(0.02)

    # -- the local API, as a vendor's system would use it ---------------------------

    async def send(self, relay: RelayHandle, to: list[str], body: str, *, sender: str | None = None,
                   **fields) -> str:
        async with relay.client() as client:
            response = await client.post(
                "/v1/messages", json={"from": sender or relay.users[0], "to": to, "body": body, **fields}
            )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    async def status(self, relay: RelayHandle, ident: str) -> dict:
        async with relay.client() as client:
            response = await client.get(f"/v1/messages/{ident}")
        assert response.status_code == 200, response.text
        return response.json()

    async def wait_status(self, relay: RelayHandle, ident: str, status: str) -> dict:
        with trio.fail_after(STEP):
            while (document := await self.status(relay, ident))["status"] != status:
                await trio.sleep(0.02)
        return document

    async def events(self, relay: RelayHandle, count: int) -> list[dict]:
        """Read events until ``count`` have arrived (long-polling), and the
        rest of what is there; return them.  To know that no more will
        come, see `settled`."""
        found: list[dict] = []
        cursor = 0
        async with relay.client() as client:
            with trio.fail_after(STEP):
                while True:
                    wait = 0 if len(found) >= count else 5
                    response = await client.get("/v1/events", params={"after": cursor, "wait": wait})
                    assert response.status_code == 200, response.text
                    page = response.json()
                    if not page["events"] and len(found) >= count:
                        return found
                    found += page["events"]
                    cursor = page["next"]

    async def settled(self, relay: RelayHandle) -> None:
        """Wait until the relay's status (over its admin socket) counts no
        recipient queued or sent: each message it sent was delivered and
        acknowledged to the hub, or failed, so none can still be on its way."""
        with trio.fail_after(STEP * 2):
            while True:
                counts = (await self.daemon_status(relay))["queues"]["recipients"]
                if counts["queued"] == counts["sent"] == 0:
                    return
                await trio.sleep(0.02)

    async def daemon_status(self, relay: RelayHandle) -> dict:
        """What ``eimis-relay status`` shows, asked over the admin socket."""
        socket = admin_socket.find_daemon(relay.config.state_dir)
        return await trio.to_thread.run_sync(admin_socket.call, socket, "status")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> LocalApi:
    """Relay A's local API of a demo configuration, with no store: for what
    it decides before anything is stored (validation, bounds)."""
    directory = tmp_path_factory.mktemp("api")
    demo.init(directory)
    config = load_relay_config(directory / "relay-a.toml")
    return LocalApi(config, store=None, outbox_changed=Signal(), events=Signals(), uplink_state=lambda: "down",
                    on_accepted=lambda priority: None)


@pytest.fixture
async def space(tmp_path: Path, nursery: trio.Nursery) -> Space:
    return await Space(tmp_path, nursery).start()


@pytest.fixture
def stopped_space(tmp_path: Path, nursery: trio.Nursery) -> Space:
    """The same space, nothing started: the test decides the order."""
    return Space(tmp_path, nursery)


def dump(document: object) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


@pytest.fixture
def conn(tmp_path: Path):
    """A relay's database, migrated, on a real file (test modules about
    another database, the hub's or the audit trail alone, override it)."""
    conn = connect(tmp_path / "relay.db")
    migrate(conn, relay_queue.MIGRATIONS, "relay")
    yield conn
    conn.close()
