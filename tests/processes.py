"""Real processes of a demo space, for the end-to-end and fault suites:
the files of `eimis-relay demo --init-only`, a hub and two relays started
from them as an admin would, each with its log in the test's directory.

Every daemon binds port 0 the first time and the test reads the port it
got from its log line ("listening on", "local API on"); the config is
then pinned to that port, so that a daemon the test restarts comes back
where the others look for it.  Nothing picks a port in advance."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from relay.cli import demo
from relay.net import admin_socket

STEP = 20.0
HUB_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
RELAY_LISTENING = re.compile(r"local API on 127\.0\.0\.1:(\d+)")


class Process:
    """One daemon of the space, its output kept in a log file for the test."""

    def __init__(self, directory: Path, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.log = directory / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self._started_at = 0  # where this start's lines begin in the log

    def start(self, env: dict[str, str] | None = None) -> None:
        self._started_at = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "relay", *self.argv], stdout=log, stderr=log,
                                          env=env)

    async def reported(self, pattern: re.Pattern) -> re.Match:
        """The first line of this start's log that matches ``pattern`` (the
        daemon logs its listeners once they are bound)."""
        with trio.fail_after(STEP):
            while True:
                with self.log.open("rb") as log:
                    log.seek(self._started_at)
                    text = log.read().decode(errors="replace")
                if match := pattern.search(text):
                    return match
                if self.popen.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{text[-3000:]}")
                await trio.sleep(0.05)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STEP)

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=STEP)


class Site:
    """A relay as its hospital's messaging system sees it."""

    def __init__(self, manifest: dict, process: Process) -> None:
        self.domain = manifest["domain"]
        self.config = Path(manifest["config"])
        self.url = ""  # known once the relay has said which port it got
        self.token = manifest["token"]
        self.users = manifest["users"]
        self.process = process

    @property
    def state(self) -> Path:
        return self.config.parent / f"state-{self.config.stem}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=STEP)

    async def uplink(self, state: str) -> None:
        """Wait until /healthz reports ``state`` (readiness, never a guessed sleep)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            with trio.fail_after(STEP):
                while True:
                    try:
                        if (await client.get("/healthz")).json()["uplink"] == state:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    async def send(self, to: str, body: str) -> str:
        async with self.client() as client:
            response = await client.post("/v1/messages", json={"from": self.users[0], "to": [to], "body": body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    async def status(self, ident: str) -> str:
        async with self.client() as client:
            return (await client.get(f"/v1/messages/{ident}")).json()["status"]

    async def wait_delivered(self, idents: list[str]) -> None:
        with trio.fail_after(STEP * 2):
            for ident in idents:
                while (status := await self.status(ident)) != "delivered":
                    assert status in ("queued", "sent"), status
                    await trio.sleep(0.05)

    async def events(self, count: int, *, token: str | None = None) -> list[dict]:
        """The events, long-polling until at least ``count`` are there.  To
        know that no more will come, see `settled`."""
        found: list[dict] = []
        cursor = 0
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=STEP) as client:
            with trio.fail_after(STEP * 6):
                while True:
                    wait = 0 if len(found) >= count else 5
                    page = (await client.get("/v1/events", params={"after": cursor, "wait": wait})).json()
                    if not page["events"] and len(found) >= count:
                        return found
                    found += page["events"]
                    cursor = page["next"]

    async def settled(self) -> dict:
        """Wait until this relay's own status (over its admin socket) counts
        no recipient queued or sent: the hub then holds nothing of this
        relay's for anyone, as every message was acknowledged by its
        destination after that relay committed it (or failed).  Nothing more
        can then arrive at a destination from here; returns the counts."""
        with trio.fail_after(STEP * 6):
            while True:
                counts = (await self.daemon_status())["queues"]["recipients"]
                if counts["queued"] == counts["sent"] == 0:
                    return counts
                await trio.sleep(0.05)

    async def daemon_status(self) -> dict:
        """What ``eimis-relay status`` shows, asked over the admin socket."""
        socket = admin_socket.find_daemon(self.state)
        return await trio.to_thread.run_sync(admin_socket.call, socket, "status")


class DemoSpace:
    """The hub and both relays of a demo directory, as processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = demo.init(directory, port=0)
        self.hub = Process(directory, "hub", ["hub", "--config", self.manifest["hub"]["config"]])
        a, b = self.manifest["relays"]
        self.a = Site(a, Process(directory, "relay-a", ["run", "--config", a["config"]]))
        self.b = Site(b, Process(directory, "relay-b", ["run", "--config", b["config"]]))
        self.processes = [self.hub, self.a.process, self.b.process]

    def edit(self, name: str, old: str, new: str) -> None:
        """Change a config file of the space before its process starts."""
        path = self.directory / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, 1))

    async def start_hub(self) -> int:
        """Start the hub and return its port; the first time, write that port
        into the hub's and the relays' configs."""
        self.hub.start()
        port = int((await self.hub.reported(HUB_LISTENING)).group(1))
        if self.manifest["hub"]["url"].endswith(":0"):
            self.edit("hub.toml", 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
            for site in (self.a, self.b):
                self.edit(site.config.name, 'hub_url = "https://127.0.0.1:0"', f'hub_url = "https://127.0.0.1:{port}"')
            self.manifest["hub"]["url"] = f"https://127.0.0.1:{port}"
        return port

    async def start_relay(self, site: Site, env: dict[str, str] | None = None) -> re.Match:
        """Start a relay and learn its local API's port (pinned the first
        time); returns its log line, which names its other listeners too."""
        site.process.start(env)
        line = await site.process.reported(RELAY_LISTENING)
        if not site.url:
            self.edit(site.config.name, 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{line.group(1)}"')
        site.url = f"http://127.0.0.1:{line.group(1)}"
        return line

    async def start_relays(self) -> None:
        await self.start_relay(self.a)
        await self.start_relay(self.b)
        await self.a.uplink("connected")
        await self.b.uplink("connected")

    async def start(self) -> None:
        await self.start_hub()
        await self.start_relays()

    def close(self) -> None:
        for process in self.processes:
            if process.popen is not None and process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait(timeout=STEP)

    def logs(self) -> str:
        return "".join(p.log.read_text() for p in self.processes if p.log.exists())
